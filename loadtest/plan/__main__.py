"""``python -m loadtest.plan [PATH]``: write the plan's JSON Schema (default docs/plan.schema.json)."""

import sys
from pathlib import Path

from loadtest.plan import write_json_schema

print(write_json_schema(*(Path(arg) for arg in sys.argv[1:2])))
