"""Ten requests on one gRPC stream; answers arrive through the callback (in any order)."""

import queue

import tritonclient.grpc as grpcclient
from _inputs import infer_inputs, make_inputs, parse_args

args = parse_args(__doc__)
client = grpcclient.InferenceServerClient(args.url)
answers = queue.Queue()
client.start_stream(callback=lambda result, error: answers.put((result, error)))
inputs = infer_inputs(grpcclient, make_inputs(args.repository, args.model, args.length))
for index in range(10):
    client.async_stream_infer(args.model, inputs, request_id=str(index))
for _ in range(10):
    result, error = answers.get(timeout=60)
    if error is not None:
        print("error:", error)
        continue
    response = result.get_response()
    print("request", response.id, [(o.name, list(o.shape)) for o in response.outputs])
client.stop_stream()
