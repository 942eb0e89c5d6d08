"""One HTTP/REST call (/v2/models/NAME/infer); give --url the HTTP port (e.g. 127.0.0.1:8000)."""

import tritonclient.http as httpclient
from _inputs import infer_inputs, make_inputs, parse_args

args = parse_args(__doc__)
client = httpclient.InferenceServerClient(args.url.removeprefix("http://"))
inputs = infer_inputs(httpclient, make_inputs(args.repository, args.model, args.length))
parameters = {"reorch_record": True} if "reorch" in args.model else None
result = client.infer(args.model, inputs, parameters=parameters)
for output in result.get_response()["outputs"]:
    print(output["name"], result.as_numpy(output["name"]).shape)
if parameters:
    print("REORCH_RECORD", result.as_numpy("REORCH_RECORD")[0, 0].decode())
