set -x
export PYTHONPATH=src PYTHONUNBUFFERED=1
python3 -c "import torch,triton;print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q tests/gpu tests/models tests/ops -x 2>&1 | tail -3
python3 benchmarks/probe_presets.py --out $OUT/presets_reference.json
python3 - <<'PY'
import torch
from torch.profiler import profile, ProfilerActivity
from muse_lm import MuseLM, get_preset
p=get_preset("8gb"); m=MuseLM(p.model).cuda(); m.check_ids=False
ids=torch.randint(0,32768,(8,1025),device="cuda")
def f():
    with torch.autocast("cuda",dtype=torch.bfloat16): l=m(ids[:,:-1],ids[:,1:])
    l.backward()
f(); torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    f(); torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
PY
timeout 200 python3 -m muse_lm train --steps 20 --out /tmp/autorun 2>&1 | tr '\r' '\n' | grep -v "^$" | tail -8
