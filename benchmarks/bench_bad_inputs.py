"""Every bad input of docs/reliability.md, each run in a fresh subprocess: is the answer a clear error?

    python benchmarks/bench_bad_inputs.py [--work-dir /tmp/mimo_bad_inputs] [--timeout 60] [-k NAME]

Each case builds its inputs in its own directory (a copy of a small Hub-layout checkpoint, a
prepared directory, a planted symlink, a FIFO, ...) beside a file that must never change, runs a
command (`prepare-weights`, `run_example.py`, or a few lines of Python calling the API), and is
classified:

* clear: non-zero exit, no traceback, and the expected message fragment in the output;
* traceback: Python printed one; unclear: failed without the expected message; accepted: exit 0;
* hang: still running after --timeout seconds (killed);
* damaged: any file in the case's directory differs afterwards (outside OUTPUT, or a partial or
  half-written OUTPUT; a refused run must leave everything as it was).

Goal: all clear, 0 tracebacks / 0 hangs / 0 damaged. Prints a table and writes
benchmarks/results/bench_bad_inputs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

PREPARE = [sys.executable, "-m", "mimo_prepare_weights", "--no-progress"]
RUN = [sys.executable, os.path.join(ROOT, "run_example.py")]
INDEX = "model.safetensors.index.json"


@dataclass
class Case:
    name: str
    kind: str                        # the class of bad input (the docs' table groups by it)
    setup: Callable                  # (case dir, shared fixtures) -> argv, or (argv, cleanup)
    expect: str                      # message fragment of the clear error


def api(code: str) -> list[str]:
    """Python lines that call the API; an exception is printed as 'ERROR Class: message', exit 2."""
    wrapped = ("import sys\ntry:\n" + "".join(f"    {line}\n" for line in code.splitlines()) +
               "except Exception as err:\n    print(f'ERROR {type(err).__name__}: {err}')\n    sys.exit(2)\n")
    return [sys.executable, "-c", wrapped]


# ---- case builders ----------------------------------------------------------------------------------
def copy_source(d, fx):
    shutil.copytree(fx["hub"], os.path.join(d, "src"))
    return os.path.join(d, "src")


def planted(name):
    def setup(d, fx):
        out = os.path.join(d, "out")
        os.makedirs(out)
        os.symlink(os.path.join(d, "precious.txt"), os.path.join(out, name))
        return PREPARE + [fx["hub"], out, "--world-size", "2"]
    return setup


def verify_symlinked_file(d, fx):
    out = os.path.join(d, "out")
    shutil.copytree(fx["prepared"], out)
    name = "experts-00000-of-00002.safetensors"
    shutil.move(os.path.join(out, name), os.path.join(d, "elsewhere"))
    os.symlink(os.path.join(d, "elsewhere"), os.path.join(out, name))
    return PREPARE + ["--verify", out]


def index_entry(value):
    def setup(d, fx):
        src = copy_source(d, fx)
        index = json.load(open(os.path.join(src, INDEX)))
        index["weight_map"]["model.norm.weight"] = value
        json.dump(index, open(os.path.join(src, INDEX), "w"))
        return PREPARE + [src, os.path.join(d, "out")]
    return setup


def index_text(text):
    def setup(d, fx):
        src = copy_source(d, fx)
        open(os.path.join(src, INDEX), "w").write(text)
        return PREPARE + [src, os.path.join(d, "out")]
    return setup


def manifest_edit(edit):
    def setup(d, fx):
        out = os.path.join(d, "out")
        shutil.copytree(fx["prepared"], out)
        manifest = json.load(open(os.path.join(out, "manifest.json")))
        edit(manifest)
        json.dump(manifest, open(os.path.join(out, "manifest.json"), "w"))
        return PREPARE + ["--verify", out]
    return setup


def shard_header(header):
    def setup(d, fx):
        src = copy_source(d, fx)
        raw = json.dumps(header).encode()
        with open(os.path.join(src, "model_final.safetensors"), "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw + bytes(8))
        return PREPARE + [src, os.path.join(d, "out")]
    return setup


def nan_source(dtype):
    def setup(d, fx):
        from hub_fixture import rewrite_shard
        src = copy_source(d, fx)
        name = "model.layers.3.mlp.experts.15.down_proj.weight"

        def edit(t):
            t[name].reshape(-1).view("uint8")[5] = 0x7F          # e4m3fn NaN
        rewrite_shard(src, "model_3_linear_fc2.safetensors", edit)
        return PREPARE + [src, os.path.join(d, "out"), "--world-size", "2", "--weight-dtype", dtype]
    return setup


def changed_source_on_resume(d, fx):
    from hub_fixture import rewrite_shard
    src = copy_source(d, fx)
    out = os.path.join(d, "out")
    shutil.copytree(fx["prepared"], out)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    manifest["complete"] = False        # an interrupted run of this very source ...
    manifest["source"]["shards"] = {k: {**v, "mtime_ns": os.stat(os.path.join(src, k)).st_mtime_ns}
                                    for k, v in manifest["source"]["shards"].items()}
    json.dump(manifest, open(os.path.join(out, "manifest.json"), "w"))
    rewrite_shard(src, "model_1.safetensors",          # ... whose shard then changed
                  lambda t: t["model.layers.1.input_layernorm.weight"].__imul__(2))
    return PREPARE + [src, out, "--world-size", "2"]


def fifo_in_source(name):
    def setup(d, fx):
        src = copy_source(d, fx)
        os.remove(os.path.join(src, name))
        os.mkfifo(os.path.join(src, name))
        return PREPARE + [src, os.path.join(d, "out")]
    return setup


def source_is_output(d, fx):
    src = copy_source(d, fx)
    return PREPARE + [src, src]


def locked_output(d, fx):
    out = os.path.join(d, "out")
    os.makedirs(out)
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time\nfrom mimo_v2_flash.fileguard import DirectoryLock\n"
                               f"with DirectoryLock({out!r}, ValueError, 'another conversion'):\n"
                               "    print('held', flush=True)\n    time.sleep(600)\n"],
                              stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()
    return PREPARE + [fx["hub"], out], lambda: (holder.kill(), holder.wait())


def binary_placement(d, fx):
    path = os.path.join(d, "placement.json")
    open(path, "wb").write(b"\xff\xfe\x00binary")
    return PREPARE + [fx["hub"], os.path.join(d, "out"), "--placement", path]


def config_file(kind):
    def setup(d, fx):
        cfg = os.path.join(d, "cfg")
        os.makedirs(cfg)
        target = os.path.join(cfg, "config.json")
        if kind == "directory":
            os.makedirs(target)
        elif kind == "loop":
            os.symlink(os.path.join(cfg, "b"), target)
            os.symlink(target, os.path.join(cfg, "b"))
        elif kind == "binary":
            open(target, "wb").write(bytes(range(256)))
        elif kind == "deep":
            open(target, "w").write("[" * 100_000 + "]" * 100_000)
        elif kind == "fifo":
            os.mkfifo(target)
        else:       # a size key
            from mimo_v2_flash import load_config
            data = load_config("tiny").to_hub_dict()
            data[kind] = 10 ** 9
            json.dump(data, open(target, "w"))
        return RUN + ["--mode", "random", "--config", cfg]
    return setup


def nan_prepared(d, fx):
    from mimo_v2_flash.safetensors_io import SafetensorsFile
    out = os.path.join(d, "out")
    shutil.copytree(fx["prepared"], out)
    path = os.path.join(out, "replicated.safetensors")
    handle = SafetensorsFile(path)
    with open(path, "r+b") as f:
        f.seek(handle.data_start + handle.offsets["model.norm.weight"][0])
        f.write(struct.pack("<H", 0x7FC0))
    return RUN + ["--mode", "generate", "--weights", out, "--max-new-tokens", "2"]


MODEL = "from mimo_v2_flash import MiMoV2FlashModel\nimport numpy as np\nm = MiMoV2FlashModel.random('tiny')\n"
KERNEL = ("import numpy as np\nfrom mimo_kernels.rmsnorm import rmsnorm\n"
          "rmsnorm(np.ones((4, 256), np.float32), np.ones(255, np.float32))\n")
HDR = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

CASES = [
    Case("output: symlinked .partial", "symlink in output", planted("replicated.safetensors.partial"), "is a symlink"),
    Case("output: symlinked manifest partial", "symlink in output", planted("manifest.json.partial"), "is a symlink"),
    Case("output: symlinked write probe", "symlink in output", planted(".write-probe.partial"), "is a symlink"),
    Case("output: symlink at a final name", "symlink in output", planted("experts-00001-of-00002.safetensors"), "is a symlink"),
    Case("verify: a file replaced by a symlink", "symlink in output", verify_symlinked_file, "is a symlink (refused"),
    Case("index: ../ shard name", "path traversal", index_entry("../outside.safetensors"), "not a plain file name"),
    Case("index: absolute shard name", "path traversal", index_entry("/etc/passwd"), "not a plain file name"),
    Case("index: '*' shard name (a glob)", "3,11", index_entry("*"), "not a plain file name"),
    Case("index: shard name not a string", "3,11", index_entry(7), "not a plain file name"),
    Case("manifest: ../ file name (verify)", "path traversal", manifest_edit(
        lambda m: m["files"][0].update(name="../../precious.txt")), "not a plain file name"),
    Case("manifest: files not a list (verify)", "clear message", manifest_edit(lambda m: m.update(files={})),
         "'files' must be a list"),
    Case("config: num_hidden_layers 1e9", "memory bomb", config_file("num_hidden_layers"), "exceeds the limit"),
    Case("config: hidden_size 1e9", "memory bomb", config_file("hidden_size"), "exceeds the limit"),
    Case("config: the full model in float32 on this host", "memory bomb",
         lambda d, fx: RUN + ["--mode", "random", "--config", "full"], "float32 weights need"),
    Case("safetensors: aliasing offsets", "aliased offsets", shard_header({"a": HDR, "b": HDR}), "overlapping or aliasing"),
    Case("safetensors: shape not a list", "aliased offsets", shard_header({"a": {**HDR, "shape": "2"}}),
         "expected a list of non-negative integers"),
    Case("safetensors: huge shape", "aliased offsets", shard_header({"a": {**HDR, "shape": [2 ** 62, 2 ** 62]}}), "needs"),
    Case("source: NaN weight, --weight-dtype bf16", "non-finite weights", nan_source("bf16"), "non-finite value nan"),
    Case("source: NaN weight, --weight-dtype fp8", "non-finite weights", nan_source("fp8"), "non-finite value nan"),
    Case("prepared: NaN weight at load", "non-finite weights", nan_prepared, "non-finite value nan"),
    Case("resume: source shard changed", "stale resume", changed_source_on_resume, "source shard model_1.safetensors changed"),
    Case("generate: past max_position_embeddings", "position limit",
         lambda d, fx: api(MODEL + "m.generate(np.zeros((1, 10), np.int64), max_new_tokens=5000)"),
         "beyond max_position_embeddings=4096"),
    Case("forward_ragged: slot -1", "sequence indices", lambda d, fx: api(
        MODEL + "m.forward_ragged([[1], [2]], m.new_cache(2), [0, -1])"), "outside the cache slots"),
    Case("forward_ragged: duplicate slots", "sequence indices", lambda d, fx: api(
        MODEL + "m.forward_ragged([[1], [2]], m.new_cache(2), [1, 1])"), "names a slot twice"),
    Case("forward_ragged: short slot list", "sequence indices", lambda d, fx: api(
        MODEL + "m.forward_ragged([[1], [2]], m.new_cache(2), [0])"), "1 entries for 2 sequences"),
    Case("run_example: config is a directory", "clear message", config_file("directory"), "is a directory"),
    Case("run_example: config symlink loop", "clear message", config_file("loop"), "symlink loop"),
    Case("run_example: config binary", "clear message", config_file("binary"), "not UTF-8 text"),
    Case("run_example: config nested 100000 deep", "clear message", config_file("deep"), "nested too deeply"),
    Case("run_example: config is a FIFO", "clear message", config_file("fifo"), "is a FIFO"),
    Case("prepare: shard is a FIFO", "clear message", fifo_in_source("model_2.safetensors"), "is a FIFO"),
    Case("prepare: config is a FIFO", "clear message", fifo_in_source("config.json"), "is a FIFO"),
    Case("index: not a JSON object", "clear message", index_text("[1, 2]"), "must be a JSON object"),
    Case("index: nested 100000 deep", "clear message", index_text("[" * 100_000 + "]" * 100_000), "nested too deeply"),
    Case("prepare: placement table binary", "clear message", binary_placement, "not UTF-8 text"),
    Case("prepare: SOURCE == OUTPUT", "clear message", source_is_output, "is the source checkpoint"),
    Case("prepare: concurrent conversion", "clear message", locked_output, "locked by pid"),
    Case("run_example: --temperature -1", "clear message",
         lambda d, fx: RUN + ["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    Case("generate: top_p 1.5", "clear message", lambda d, fx: api(
        MODEL + "m.generate(np.zeros((1, 3), np.int64), 2, temperature=1.0, top_p=1.5)"), "top_p must be in"),
    Case("generate: top_k 0", "clear message", lambda d, fx: api(
        MODEL + "m.generate(np.zeros((1, 3), np.int64), 2, temperature=1.0, top_k=0)"), "top_k must be an integer"),
    Case("run_example: --num-layers 0", "clear message", lambda d, fx: RUN + ["--num-layers", "0"], "--num-layers must be >= 1"),
    Case("run_example: placement flag in one process", "clear message",
         lambda d, fx: RUN + ["--ep-placement", "p.json"], "under torchrun only"),
    Case("run_example: token id outside the vocabulary", "clear message",
         lambda d, fx: RUN + ["--prompt-ids", "1,2,99999"], "outside the model's vocabulary"),
    Case("run_example: --mode download without network", "clear message",
         lambda d, fx: RUN + ["--mode", "download", "--local-dir", os.path.join(d, "dl"),
                              "--output-dir", os.path.join(d, "out")], "cannot reach the Hub"),
    Case("kernel: bad shape under python -O", "clear message",
         lambda d, fx: [sys.executable, "-O"] + api(KERNEL)[1:], "KernelInputError: rmsnorm: weight shape"),
]


# ---- running ---------------------------------------------------------------------------------------
def snapshot(path) -> dict[str, bytes | str]:
    out = {}
    for root, dirs, files in os.walk(path):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            if os.path.islink(full):
                out[rel] = "-> " + os.readlink(full)
            elif os.path.isfile(full):
                out[rel] = open(full, "rb").read()
            else:
                out[rel] = "special"
    return out


def run_case(case: Case, work: str, fixtures: dict, timeout: float) -> dict:
    d = os.path.join(work, case.name.replace(" ", "_").replace("/", "_").replace(":", "").replace("'", ""))
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    open(os.path.join(d, "precious.txt"), "w").write("do not touch")
    made = case.setup(d, fixtures)
    argv, cleanup = made if isinstance(made, tuple) else (made, None)
    before = snapshot(d)
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("WORLD_SIZE", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=d, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        hung = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        hung = True
    seconds = time.perf_counter() - t0
    if cleanup:
        cleanup()
    text = out + err
    if hung:
        verdict = "hang"
    elif "Traceback (most recent call last)" in err:
        verdict = "traceback"
    elif proc.returncode == 0:
        verdict = "accepted"
    else:
        verdict = "clear" if case.expect in text else "unclear"
    damaged = snapshot(d) != before
    message = next((line for line in text.splitlines() if "error" in line.lower() or "ERROR" in line
                    or "refused" in line), text.strip().splitlines()[-1] if text.strip() else "")
    return {"case": case.name, "kind": case.kind, "verdict": verdict, "damaged": damaged,
            "exit": None if hung else proc.returncode, "seconds": round(seconds, 2), "message": message[:300]}


def build_fixtures(work: str) -> dict:
    from hub_fixture import write_hub_fixture
    from mimo_prepare_weights.convert import convert
    hub = os.path.join(work, "_fixture", "hub")
    prepared = os.path.join(work, "_fixture", "prepared")
    if not os.path.exists(os.path.join(prepared, "manifest.json")):
        shutil.rmtree(os.path.join(work, "_fixture"), ignore_errors=True)
        write_hub_fixture(hub)
        convert(hub, prepared, world_size=2, progress=False, log=lambda *_: None)
    return {"hub": hub, "prepared": prepared}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="/tmp/mimo_bad_inputs")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a case counts as a hang")
    p.add_argument("-k", help="only cases whose name contains this")
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "bench_bad_inputs.json"))
    args = p.parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    fixtures = build_fixtures(args.work_dir)
    cases = [c for c in CASES if not args.k or args.k in c.name]
    rows = []
    for case in cases:
        row = run_case(case, args.work_dir, fixtures, args.timeout)
        rows.append(row)
        flag = "" if row["verdict"] == "clear" and not row["damaged"] else "  <-- " + row["verdict"] + \
            (" DAMAGED" if row["damaged"] else "")
        print(f"{row['kind']:>18}  {row['case']:<48} {row['verdict']:<9} {row['seconds']:>6.1f} s  "
              f"{row['message'][:110]}{flag}", flush=True)
    count = {v: sum(r["verdict"] == v for r in rows) for v in ("clear", "traceback", "hang", "accepted", "unclear")}
    damaged = sum(r["damaged"] for r in rows)
    print(f"\ntried {len(rows)}, clear errors {count['clear']}, tracebacks {count['traceback']}, hangs "
          f"{count['hang']}, data damaged {damaged} (accepted silently {count['accepted']}, unclear "
          f"{count['unclear']})")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"tried": len(rows), **count, "damaged": damaged, "cases": rows}, f, indent=1)
    return 0 if count["clear"] == len(rows) and not damaged else 1


if __name__ == "__main__":
    sys.exit(main())
