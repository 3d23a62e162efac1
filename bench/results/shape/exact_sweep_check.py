"""old vs new shape exact sweep vs brute force, same run, 1 thread."""
import sys, time, json, os, importlib.util
import numpy as np
from pathlib import Path
from batch_index.build.shards import BuildConfig, build_index
from batch_index.search import SearchIndex, SearchParams
from batch_index.engine.metrics import scores
from batch_index.engine.shape_index import ShapeSpaces
from bench.data import synthetic, Perturb
from bench.measure import capped_threads
spec = importlib.util.spec_from_file_location("old_si", "/tmp/h15/old_shape_index.py"); old = importlib.util.module_from_spec(spec); sys.modules["old_si"] = old; spec.loader.exec_module(old)
n = int(sys.argv[1]); nq = int(sys.argv[2])
data = synthetic(n, 200, seed=3, cache=Path("/tmp/h15/data"), perturb=Perturb(max_shift=250))
path = Path(f"/tmp/h15/idx-{n}")
if not (path / "manifest.json").exists():
    t = time.perf_counter()
    with capped_threads(1):
        build_index(data.ids, data.corpus, path, BuildConfig(metrics=("shape",)), sampling_rate=250.0, overwrite=True)
    print("build", time.perf_counter() - t, flush=True)
idx = SearchIndex.load(path).warm()
res = {"n": n, "load": os.getloadavg()}
p = SearchParams.for_metric("shape")
for qname, q in data.queries.items():
    q = q[:nq]
    with capped_threads(1):
        t = time.perf_counter(); new_i, new_s = idx.search_arrays(q, "shape", "exact", 10, p); tn = time.perf_counter() - t
        orig = ShapeSpaces._bounded_sweep
        ShapeSpaces._bounded_sweep = old.ShapeSpaces._bounded_sweep
        t = time.perf_counter(); old_i, old_s = idx.search_arrays(q, "shape", "exact", 10, p); to = time.perf_counter() - t
        ShapeSpaces._bounded_sweep = orig
        t = time.perf_counter(); bf = [scores(r, data.corpus, "shape", max_lag=idx.shape_max_lag) for r in q]; bf_i = np.array([np.argsort(-b, kind="stable")[:10] for b in bf]); bf_s = np.take_along_axis(np.array(bf), bf_i, 1); tb = time.perf_counter() - t
    res[qname] = {"queries": len(q), "new_qps": len(q) / tn, "old_qps": len(q) / to, "brute_qps": len(q) / tb,
                  "new_equals_brute": bool((new_i == bf_i).all()), "old_equals_brute": bool((old_i == bf_i).all()),
                  "max_score_diff": float(np.abs(new_s - bf_s).max())}
    print(qname, res[qname], os.getloadavg(), flush=True)
Path("/tmp/h15/exact_bench.json").write_text(json.dumps(res, indent=1))
