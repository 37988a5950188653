"""Image-quality evaluation of DeLeaker on SLIM-format prompt sets (`deleaker eval`).

data      SLIM-format records (loader + the shipped sample)
run       vanilla / DeLeaker / reference images for every record and seed (resumable)
store     run-folder layout, manifest and atomic writes
client    OpenAI-compatible chat endpoint: timeouts, retries, bounded concurrency, strict JSON
judges    the judge registry: paper (VLM protocol), vqascore, lpips, toyworld
report    outcome table with bootstrap CIs, bar chart, HTML gallery
cli       `deleaker eval run|judge|report`
"""
