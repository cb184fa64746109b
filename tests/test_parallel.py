"""Context parallelism on CPU: two gloo processes, Ulysses degree 2 or CFG-parallel, on the tiny model.

Each parallel run is compared with a single process: the frames must be equal, and so must
the merged weights on every rank after each LoRA swap.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from wanlora import InvalidInput, LoraDownloadError, ParallelPlan, WanLoraError, WanLoraPipeline, WorkerCrashed
from wanlora.frontends.service import PredictorInputs
from wanlora.runtime.attention import BACKENDS, choose_backend, unavailable_reason
from wanlora.tiny import tiny_transformer

from .builders import write_lora
from .conftest import SMALL, assert_frames_agree, probe, recorded, run_cli
from .processes import alive, children_with, free_port, wait_for
from .servers import FileServer, Route
from .test_cli import FOX

# ------------------------------------------------------------------ plans, checked before anything loads


@pytest.mark.parametrize(
    ("world", "heads", "cfg", "plan"),
    [
        (2, 40, False, ParallelPlan(ulysses=2)),
        (5, 40, False, ParallelPlan(ulysses=5)),
        (8, 40, False, ParallelPlan(ulysses=8)),
        (8, 12, False, ParallelPlan(ulysses=4, ring=2)),  # 1.3B needs ring for 8
        (6, 12, False, ParallelPlan(ulysses=6)),
        (8, 40, True, ParallelPlan(ulysses=4, cfg=True)),
        (2, 12, True, ParallelPlan(cfg=True)),
    ],
)
def test_auto_plan_uses_ulysses_as_far_as_the_heads_allow(world, heads, cfg, plan):
    got = ParallelPlan.auto(world, heads, cfg)
    assert got == plan and got.world_size == world
    got.check(heads, world, "model", "cuda")


def test_plans_that_cannot_work_are_refused_with_the_reason():
    with pytest.raises(InvalidInput, match=r"ulysses=3 .*divisor of t2v-14b's 40 attention heads \(1, 2, 4, 5, 8"):
        ParallelPlan(ulysses=3).check(40, 3, "t2v-14b", "cuda")
    with pytest.raises(InvalidInput, match="ulysses=8 .*12 attention heads.*put the rest in ring"):
        ParallelPlan(ulysses=8).check(12, 8, "t2v-1.3b", "cuda")
    with pytest.raises(InvalidInput, match="= 4 processes, but there are 2"):
        ParallelPlan(ulysses=2, ring=2).check(40, 2, "t2v-14b", "cuda")
    with pytest.raises(InvalidInput, match="ring=2 .*1 on cpu"):
        ParallelPlan(ring=2).check(40, 2, "t2v-14b", "cpu")
    with pytest.raises(InvalidInput, match="ring=0"):
        ParallelPlan(ulysses=2, ring=0).check(40, 2, "t2v-14b", "cuda")
    with pytest.raises(InvalidInput, match="cfg_parallel.*even number of processes, not 3"):
        ParallelPlan.auto(3, 40, cfg=True)


def test_a_size_that_does_not_split_evenly_is_rounded_to_one_that_does():
    from wanlora.models import CATALOGUE

    spec = CATALOGUE["t2v-14b"]

    def tokens(width, height):
        return spec.token_count(width, height, 81)

    assert tokens(832, 480) == 21 * 30 * 52
    for degree in (2, 4, 5, 8):
        assert ParallelPlan(ulysses=degree).split_size(832, 480, tokens, 16) == (832, 480)
    assert ParallelPlan(ulysses=8).split_size(1280, 720, tokens, 16) == (1280, 720)
    assert tokens(624, 624) == 31941  # odd: two ranks cannot split it
    for degree in (2, 4, 8):
        width, height = ParallelPlan(ulysses=degree).split_size(624, 624, tokens, 16)
        assert tokens(width, height) % degree == 0 and width % 16 == height % 16 == 0
        assert abs(width * height - 624 * 624) <= 2 * 16 * 640
    assert ParallelPlan(cfg=True).split_size(624, 624, tokens, 16) == (624, 624)  # CFG-parallel splits no tokens
    ti2v = CATALOGUE["ti2v-5b"]  # 16x VAE: 31 latent frames x (704/32) x (1280/32)
    assert ti2v.token_count(1280, 704, 121) == 31 * 22 * 40


def test_attention_backends_match_what_diffusers_can_split():
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    splittable = _AttentionBackendRegistry._supports_context_parallel
    for name, backend in BACKENDS.items():
        assert backend.context_parallel == (AttentionBackendName(backend.dispatcher_name).value in splittable), name
    assert choose_backend("auto", torch.device("cpu"), "ulysses") == "sdpa"
    cuda = torch.device("cuda")
    assert "cannot split" in unavailable_reason("sdpa-efficient", cuda, "ulysses")
    assert "log-sum-exp" in unavailable_reason("sdpa", cuda, "ring")
    assert choose_backend("auto", cuda, "ulysses") == "sdpa"  # never xformers, which cannot be split
    assert choose_backend("auto", cuda, "ring") in ("flash", "sdpa-cudnn")


def test_parallel_outside_a_process_group_says_how_to_launch(monkeypatch):
    for name in ("MASTER_ADDR", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(InvalidInput, match="launch with `torchrun`, or `wanlora generate --gpus N`"):
        WanLoraPipeline.from_pretrained("tiny", parallel="auto")


def test_a_joined_process_group_is_left_before_the_process_exits():
    """Exiting with the group alive can abort in gloo's or NCCL's destructors after the work is done."""
    script = (
        "import atexit, torch.distributed as dist\n"
        "atexit.register(lambda: print('still joined at exit:', dist.is_initialized()))  # runs last\n"
        "from wanlora.parallel.distributed import init_distributed\n"
        "init_distributed()\n"
        "print('joined:', dist.is_initialized())\n"
    )
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["joined: True", "still joined at exit: False"]


# ------------------------------------------------------------------ two gloo processes


def _rank_main(rank: int, world: int, port: int, out: Path, scenario, options: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    (out / f"rank{rank}.pkl").write_bytes(pickle.dumps(scenario(rank, **options)))


def run_ranks(scenario, out: Path, world: int = 2, **options) -> list:
    """`scenario(rank, **options)` in `world` processes of one gloo group; each rank's return value."""
    torch.multiprocessing.spawn(_rank_main, args=(world, free_port(), out, scenario, options), nprocs=world)
    return [pickle.loads((out / f"rank{rank}.pkl").read_bytes()) for rank in range(world)]


def weights_digest(pipe: WanLoraPipeline) -> str:
    digest = hashlib.sha256()
    for name, param in sorted(pipe.transformer.named_parameters()):
        digest.update(name.encode() + param.detach().numpy().tobytes())
    return digest.hexdigest()


def frames_of(video):
    return None if video is None else video.frames


def _swaps(rank: int, plan: ParallelPlan, style: str, motion: str, guidance: float) -> dict:
    """Generate, swap LoRAs, and fail a swap on rank 1 only; record frames and weight digests."""
    pipe = WanLoraPipeline.from_pretrained("tiny", parallel=plan)
    got = {"plain": frames_of(pipe.generate("a fox", seed=5, guidance_scale=guidance, **SMALL, progress=False))}
    both = [(style, 0.8), (motion, -0.5)]
    video = pipe.generate("a fox", seed=5, guidance_scale=guidance, loras=both, **SMALL, progress=False)
    got["both"], got["both_digest"] = frames_of(video), weights_digest(pipe)
    pipe.set_loras([(style, 1.0)])
    got["style_digest"] = weights_digest(pipe)

    if rank == 1:  # a download that fails on one rank only
        load = pipe.loader.load

        def flaky(ref, credentials=None):
            if ref == motion:
                raise LoraDownloadError("connection reset")
            return load(ref, credentials)

        pipe.loader.load = flaky
    try:
        pipe.set_loras([(motion, 1.0)])
    except WanLoraError as exc:
        got["failure"] = f"{type(exc).__name__}: {exc}"
    got["after_failure_digest"] = weights_digest(pipe)
    random_seed = pipe.generate("a fox", guidance_scale=guidance, **SMALL, progress=False)
    got["random_seed"] = None if random_seed is None else random_seed.seed
    return got


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("parallel-loras")
    model = tiny_transformer()
    paths = (folder / "style.safetensors", folder / "motion.safetensors")
    write_lora(paths[0], model, "original", seed=1)
    write_lora(paths[1], model, "kohya", seed=2)
    return str(paths[0]), str(paths[1])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("plan", "guidance"),
    [(ParallelPlan(ulysses=2), 5.0), (ParallelPlan(cfg=True), 5.0), (ParallelPlan(cfg=True), 1.0)],
    ids=["ulysses2", "cfg-parallel", "cfg-parallel-unguided"],
)
def test_two_processes_match_one_and_swap_loras_alike(plan, guidance, loras, tmp_path):
    style, motion = loras
    single = WanLoraPipeline.from_pretrained("tiny")
    plain = single.generate("a fox", seed=5, guidance_scale=guidance, **SMALL).frames
    both = single.generate("a fox", seed=5, guidance_scale=guidance, loras=[(style, 0.8), (motion, -0.5)], **SMALL)
    both_digest = weights_digest(single)
    single.set_loras([(style, 1.0)])
    style_digest = weights_digest(single)

    ranks = run_ranks(_swaps, tmp_path, plan=plan, style=style, motion=motion, guidance=guidance)

    main, other = ranks
    assert_frames_agree(main["plain"], plain)  # split passes: another summation order, within a level
    assert_frames_agree(main["both"], both.frames)
    assert other["plain"] is None and other["both"] is None  # only rank 0 decodes
    for rank in ranks:
        assert rank["both_digest"] == both_digest
        assert rank["style_digest"] == style_digest
        assert rank["after_failure_digest"] == style_digest  # the failed swap changed nothing anywhere
    assert main["failure"] == "WanLoraError: rank 1 failed, so every rank stopped: LoraDownloadError: connection reset"
    assert other["failure"] == "LoraDownloadError: connection reset"
    assert isinstance(main["random_seed"], int) and other["random_seed"] is None


def _diffusers_config_and_fast_mode(rank: int) -> tuple:
    from diffusers import ContextParallelConfig

    pipe = WanLoraPipeline.from_pretrained("tiny", parallel=ContextParallelConfig(ulysses_degree=2))
    try:
        pipe.generate("a fox", fast_mode="fast", **SMALL, progress=False)
        refusal = "generated"
    except InvalidInput as exc:
        refusal = str(exc)
    rounded = pipe.generate("a fox", seed=5, **{**SMALL, "width": 80}, progress=False)  # 3 x 3 x 5 = 45 tokens
    frames = frames_of(pipe.generate("a fox", seed=5, **SMALL, progress=False))
    return pipe.parallel.plan, refusal, frames, None if rounded is None else rounded.metadata


@pytest.mark.slow
def test_diffusers_config_is_accepted_and_fast_mode_refused_under_context_parallelism(tmp_path):
    ranks = run_ranks(_diffusers_config_and_fast_mode, tmp_path)
    for plan, refusal, _, _ in ranks:
        assert plan == ParallelPlan(ulysses=2)
        assert "fast_mode='fast'" in refusal and "context parallelism" in refusal
    rounded = ranks[0][3]
    assert (rounded["width"] * rounded["height"]) // 256 % 2 == 0 and abs(rounded["width"] - 80) <= 32
    single = WanLoraPipeline.from_pretrained("tiny").generate("a fox", seed=5, **SMALL)
    assert_frames_agree(ranks[0][2], single.frames)
    assert ranks[1][2] is None


# ------------------------------------------------------------------ the CLI


def test_cli_gpus_2_and_torchrun_write_the_single_process_video(tmp_path):
    single = run_cli(*FOX, "-o", str(tmp_path / "one.mp4"))
    assert single.returncode == 0, single.stderr
    for extra in (["--gpus", "2"], ["--gpus", "2", "--cfg-parallel"], ["--gpus", "2", "--compile"]):
        out = tmp_path / f"{'-'.join(extra)}.mp4"
        split = run_cli(*FOX, *extra, "-o", str(out))
        assert split.returncode == 0, split.stderr
        assert split.stdout.strip().splitlines() == [str(out)]  # one path, from rank 0
        assert_frames_agree(probe(out).frames, probe(tmp_path / "one.mp4").frames)
    by_hand = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "wanlora.frontends.cli", *FOX, "-o", str(tmp_path / "torchrun.mp4")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert by_hand.returncode == 0, by_hand.stderr
    assert_frames_agree(probe(tmp_path / "torchrun.mp4").frames, probe(tmp_path / "one.mp4").frames)


def test_cli_parallel_flags_are_checked_before_any_process_starts(cli, tmp_path):
    cases = [
        (["--gpus", "2", "--ulysses", "3"], "--ulysses=3 is not allowed: a divisor of 2"),
        (["--gpus", "2", "--ring", "2"], "ring=2 is not allowed: 1 on cpu"),
        (["--ring", "2"], "--ring=2 is not allowed: used with --gpus 2 or more"),
        (["--gpus", "3", "--cfg-parallel"], "even number of processes"),
        (["--gpus", "2", "--fast-mode", "fast"], "context parallelism"),
        (["--gpus", "2", "--cfg-parallel", "--cfg-batch"], "--cfg-batch=True is not allowed"),
        (["--gpus", "2", "--device", "cpu"], "each process takes its own device"),
    ]
    for extra, message in cases:
        result = cli(*FOX, *extra, "-o", str(tmp_path / "x.mp4"), cwd=tmp_path)
        assert result.returncode == 2, (extra, result.stderr)
        assert message in result.stderr, (extra, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert list(tmp_path.iterdir()) == []


def interrupted_long_run(tmp_path: Path, interrupt) -> tuple[int, str]:
    """A long `--gpus 2` run, hit by `interrupt(launcher, workers)` a few seconds after its workers
    start: the launcher's exit code and stderr. No output, and no worker outlives it."""
    long_run = ["--frames", "81", "--steps", "100", "--width", "512", "--height", "288"]  # a minute: never done first
    command = [sys.executable, "-m", "wanlora.frontends.cli", *FOX, "--gpus", "2", *long_run]
    launcher = subprocess.Popen(
        [*command, "-o", str(tmp_path / "x.mp4")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        workers = wait_for(
            lambda: len(found := children_with(launcher.pid, "wanlora.frontends.cli")) == 2 and found, 60
        )
        time.sleep(3)  # loading or denoising: either way the ranks now wait on each other
        interrupt(launcher, workers)
        _, stderr = launcher.communicate(timeout=60)
    finally:
        launcher.kill()
    assert not (tmp_path / "x.mp4").exists()
    wait_for(lambda: not any(alive(pid) for pid in workers), 10)
    return launcher.returncode, stderr


@pytest.mark.slow
def test_cli_a_killed_worker_stops_the_run_with_a_clear_error(tmp_path):
    def kill_rank_1(launcher, workers):
        os.kill(next(pid for pid, env in workers.items() if env.get("RANK") == "1"), signal.SIGKILL)

    code, stderr = interrupted_long_run(tmp_path, kill_rank_1)
    assert code == 1
    assert "wanlora: error: worker process 1 was killed by SIGKILL; the other workers were stopped" in stderr


@pytest.mark.slow
def test_cli_ctrl_c_stops_every_worker_and_says_so_once(tmp_path):
    code, stderr = interrupted_long_run(tmp_path, lambda launcher, _: launcher.send_signal(signal.SIGINT))
    assert code == 130
    said = [line for line in stderr.splitlines() if "wanlora:" in line]
    assert said == [  # the seed, said once, by the launcher (not its workers)
        "wanlora: seed 7 (--seed 7 makes this video again)",
        "wanlora: interrupted (SIGINT); the workers were stopped",
    ], stderr


# ------------------------------------------------------------------ the predictor's persistent workers


@pytest.fixture(scope="module")
def worker_group():
    from wanlora.frontends.workers import WorkerGroup

    os.environ.update(WANLORA_MODEL="tiny", WANLORA_ALLOW_PRIVATE_URLS="1")  # LoRAs come from loopback
    group = WorkerGroup(2)
    yield group
    group.close()
    for name in ("WANLORA_MODEL", "WANLORA_ALLOW_PRIVATE_URLS"):
        del os.environ[name]


REQUEST = {"prompt": "a fox", "num_frames": 9, "sample_steps": 2, "fps": 12, "seed": 11}


def test_worker_group_answers_like_one_process_and_relays_errors(worker_group, tmp_path):
    from wanlora.frontends.service import VideoService

    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    single = VideoService(override="tiny").generate(PredictorInputs(**REQUEST), tmp_path / "one")
    shared = worker_group.generate(PredictorInputs(**REQUEST), tmp_path / "two")
    assert (shared.seed, shared.frames) == (single.seed, single.frames)
    assert_frames_agree(probe(shared.path).frames, probe(single.path).frames)
    with pytest.raises(InvalidInput, match="num_frames=500"):
        worker_group.generate(PredictorInputs(**{**REQUEST, "num_frames": 500}), tmp_path)
    assert worker_group.generate(PredictorInputs(**REQUEST), tmp_path / "two").seed == 11  # still serving


def test_worker_group_sweeps_like_one_process(worker_group, tmp_path):
    from wanlora.frontends.service import VideoService

    write_lora(tmp_path / "style.safetensors", tiny_transformer(), "original", seed=3)
    (tmp_path / "shared").mkdir()
    with FileServer() as server:
        server.routes["/style.safetensors"] = Route(body=(tmp_path / "style.safetensors").read_bytes())
        request = {**REQUEST, "lora_weights": f"{server.url}/style.safetensors", "lora_scale_sweep": "0,1"}
        single = VideoService(override="tiny").generate(PredictorInputs(**request), tmp_path)
        shared = worker_group.generate(PredictorInputs(**request), tmp_path / "shared")
    assert shared.path.name == single.path.name == "wanlora-sweep-11.mp4"
    assert_frames_agree(probe(shared.path).frames, probe(single.path).frames)
    assert [cell["loras"][0]["strength"] for cell in recorded(shared.path)["sweep"]["cells"]] == [0.0, 1.0]


def test_worker_group_survives_a_killed_worker(worker_group, tmp_path):
    import threading

    worker_group.wait_ready()
    victim = worker_group.pids[1]
    threading.Timer(2.0, os.kill, (victim, signal.SIGKILL)).start()
    started = time.perf_counter()
    with pytest.raises(WorkerCrashed, match=rf"worker 1 \(pid {victim}, exit code -9\) stopped during the request"):
        worker_group.generate(PredictorInputs(**{**REQUEST, "num_frames": 81, "sample_steps": 100}), tmp_path)
    assert time.perf_counter() - started < 30
    assert victim not in worker_group.pids  # a fresh group is starting
    assert worker_group.generate(PredictorInputs(**REQUEST), tmp_path).frames == 9


def _answer_then_hang(conn, error: Exception | None) -> None:
    request_id, _ = conn.recv()
    if error is not None:
        conn.send((request_id, error))
    time.sleep(600)  # stuck, as a rank left alone in a collective would be


@pytest.mark.slow
def test_worker_group_stops_a_group_where_one_rank_failed_alone(monkeypatch):
    import multiprocessing

    from wanlora.frontends import workers

    monkeypatch.setattr(workers, "STRAGGLER_SECONDS", 0.5)
    group = object.__new__(workers.WorkerGroup)  # two stand-in workers instead of loaded models
    group.size, group.ready, group.next_request = 2, True, 0
    group.processes, group.connections = [], []
    for error in (LoraDownloadError("connection reset"), None):
        ours, theirs = multiprocessing.get_context("fork").Pipe()
        process = multiprocessing.get_context("fork").Process(target=_answer_then_hang, args=(theirs, error))
        process.start()
        group.processes.append(process)
        group.connections.append(ours)
    stand_ins = list(group.processes)
    started = time.perf_counter()
    with pytest.raises(LoraDownloadError, match="connection reset"):
        group.generate(PredictorInputs(prompt="a fox"), None)
    assert time.perf_counter() - started < 5
    assert group.processes == [] and not any(p.is_alive() for p in stand_ins)  # the next request starts afresh


def test_wanlora_gpus_sets_the_worker_count(monkeypatch):
    from wanlora.frontends.workers import worker_count

    monkeypatch.delenv("WANLORA_GPUS", raising=False)
    assert worker_count() == max(1, torch.cuda.device_count())
    monkeypatch.setenv("WANLORA_GPUS", "2")
    assert worker_count() == 2
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("WANLORA_GPUS", bad)
        with pytest.raises(InvalidInput, match=f"WANLORA_GPUS='{bad}'"):
            worker_count()
