import json, os, subprocess, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import payloads
from servers import KEY, start_router, start_floor, pinned, ROUTER_CONFIG
BENCH = Path(__file__).resolve().parent
def threads(pid):
    out = {}
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            st = (t / "stat").read_text(); comm = (t / "comm").read_text().strip()
        except OSError: continue
        f = st[st.rindex(")") + 2:].split()
        u, s = int(f[11]), int(f[12])
        a = out.setdefault(comm, [0, 0]); a[0] += u; a[1] += s
    return out
def wrk(url, pool, dur):
    argv = ["wrk", "-t2", "-c32", f"-d{dur}s", "--timeout", "10s", "-s", str(BENCH / "post.lua"), url, "--", str(pool), "2", "message", ""]
    p = subprocess.run(pinned(0, argv), capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            r = json.loads(line[11:]); return r["requests"] / (r["duration_us"] / 1e6), r
    raise RuntimeError(p.stdout + p.stderr)
tmp = Path(tempfile.mkdtemp(prefix="wrkexp-"))
pool = payloads.write_pool(tmp / "pool.txt", 200_000, KEY.encode()).path
which = sys.argv[1] if len(sys.argv) > 1 else "router"
dur = int(sys.argv[2]) if len(sys.argv) > 2 else 8
if which == "floor":
    srv = start_floor(tmp, 1, "uvloop"); url = f"http://127.0.0.1:{srv.port}/webhook"; pid = srv.pid
else:
    r = start_router("router", tmp, 1); srv = r.server; url = f"http://127.0.0.1:{srv.port}/webhook"; pid = srv.pid
try:
    wrk(url, pool, 2)
    tick = os.sysconf("SC_CLK_TCK")
    for run in range(int(sys.argv[3]) if len(sys.argv) > 3 else 2):
        a = threads(pid); rps, res = wrk(url, pool, dur); b = threads(pid)
        n = res["requests"]
        print(which, f"{rps:,.0f} req/s", {k: (round((b[k][0]-a.get(k,[0,0])[0])/tick/n*1e6,1), round((b[k][1]-a.get(k,[0,0])[1])/tick/n*1e6,1)) for k in b if b[k] != a.get(k)}, "(user, sys us/request)", flush=True)
finally:
    srv.stop()
