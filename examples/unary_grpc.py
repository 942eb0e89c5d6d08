"""One unary gRPC call (ModelInfer); reorch variants also return their record when asked."""

import tritonclient.grpc as grpcclient
from _inputs import infer_inputs, make_inputs, parse_args

args = parse_args(__doc__)
client = grpcclient.InferenceServerClient(args.url)
inputs = infer_inputs(grpcclient, make_inputs(args.repository, args.model, args.length))
parameters = {"reorch_record": True} if "reorch" in args.model else None
result = client.infer(args.model, inputs, parameters=parameters)
for output in result.get_response().outputs:
    print(output.name, result.as_numpy(output.name).shape)
if parameters:
    print("REORCH_RECORD", result.as_numpy("REORCH_RECORD")[0, 0].decode())
