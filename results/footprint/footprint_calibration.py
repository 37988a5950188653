"""Step times and peak resident set of one 3-step generation on the embedded model (footprint.jsonl).

    python footprint_calibration.py SIDE DELEAKER(0|1)
"""
import json
import resource
import sys

from deleaker.runtime import GenerateRequest, load_pipeline, preset

side = int(sys.argv[1]); deleaker = sys.argv[2] == "1"
pipe = load_pipeline()
info = pipe.backend.info
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
r = pipe.generate(GenerateRequest("a cat and a cheetah in a field", entities=("cat", "cheetah"), steps=3,
                                  height=side, width=side, deleaker=deleaker, config=preset("tiny")))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"side": side, "deleaker": deleaker, "T": info.max_text_tokens, "blocks": info.blocks_per_step,
                  "step_seconds": r.step_seconds, "rss_before_kb": base, "rss_peak_kb": peak}))
