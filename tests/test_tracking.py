"""Trackers: JSONL and sample tables always; wandb offline without prompting or network; TensorBoard events; PNGs."""

import dataclasses
import glob
import json
import logging
import struct
import time
from pathlib import Path

import pytest

from grpo.config import TrackingConfig
from grpo.tracking import Tracker, is_secret_name, plot_curves, redact, smooth, wandb_mode

SECRET = "sk-test-0123456789abcdef"


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    """No API key anywhere, an unreachable W&B server, and no WANDB_* settings from the caller."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # any network attempt fails at once
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config" / "wandb"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "home" / ".cache" / "wandb"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "home" / ".local" / "wandb"))
    monkeypatch.setattr("sys.argv", ["grpo", "train", "recipe.yaml"])
    return tmp_path


def wandb_records(run_dir: Path) -> list:
    """Records of an offline run's transaction log (`run-<id>.wandb`: LevelDB-style log blocks of protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(run_dir / "run-*.wandb"))
    data, pos, out, buf = Path(path).read_bytes(), 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and n == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            out.append(buf + chunk)
    records = []
    for raw in out:
        r = pb.Record()
        r.ParseFromString(raw)
        records.append(r)
    return records


def test_wandb_offline_and_tensorboard_without_a_key(no_wandb_login):
    out = no_wandb_login / "train"
    cfg = TrackingConfig(report_to=["wandb", "tensorboard"])  # wandb_mode auto, no key -> offline
    t0 = time.perf_counter()
    tracker = Tracker(
        out,
        cfg,
        is_main=True,
        name="train",
        run_config={"grpo": {"lr": 1e-5}, "rewards": [{"name": "x:y", "api_key": SECRET}]},
    )
    for step in range(1, 6):
        tracker.log(step, {"reward": step / 10, "kl": float("nan") if step == 3 else 0.01 * step})
    tracker.log_table(
        5,
        "samples",
        ["prompt", "completion", "accuracy", "advantage"],
        [["Q:1+1=", "<a>2</a>", 1.0, 0.5], ["Q:how to X?", "<a>sorry</a>", None, -0.5]],
    )
    tracker.close({"curves": ["reward", "kl"]})
    assert time.perf_counter() - t0 < 120  # no login prompt, no network wait
    import wandb

    wandb.teardown()  # wandb's service may still be writing the run file when finish() returns
    import os

    assert "WANDB_DIR" not in os.environ  # the process environment is left alone

    (run_dir,) = (out / "wandb").glob("offline-run-*")
    records = wandb_records(run_dir)
    history = [
        {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
        for r in records
        if r.HasField("history")
    ]
    assert [float(h["reward"]) for h in history] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert [h.get("kl") for h in history][2] is None  # non-finite values are not sent
    assert history[-1]["samples/_type"] == '"table-file"'
    (table,) = (run_dir / "files" / "media" / "table").glob("samples_5_*.table.json")
    assert json.loads(table.read_text()) == {
        "columns": ["step", "prompt", "completion", "accuracy", "advantage"],
        "data": [[5, "Q:1+1=", "<a>2</a>", 1.0, 0.5], [5, "Q:how to X?", "<a>sorry</a>", None, -0.5]],
    }
    (run,) = [r.run for r in records if r.HasField("run")]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["rewards"] == [{"name": "x:y", "api_key": "<redacted>"}] and config["grpo"] == {"lr": 1e-5}
    for f in out.rglob("*"):
        assert not f.is_file() or SECRET.encode() not in f.read_bytes(), f"secret written to {f}"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (out / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    assert [round(e.value, 6) for e in acc.Scalars("reward")] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert [e.step for e in acc.Scalars("kl")] == [1, 2, 4, 5]

    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert rows[1] == {
        "step": 5,
        "prompt": "Q:how to X?",
        "completion": "<a>sorry</a>",
        "accuracy": None,
        "advantage": -0.5,
    }
    assert (out / "curves.png").stat().st_size > 0


@pytest.fixture
def refusing_wandb_server(monkeypatch):
    """A local W&B server that answers every request 401 (a key the server does not accept): an online start fails
    within seconds (an unreachable host fails too, but only after wandb's 60 s init timeout)."""
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_response(401)
            self.end_headers()
            self.wfile.write(b'{"errors": [{"message": "invalid api key"}]}')

        do_GET = do_POST

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
    yield server
    server.shutdown()


def test_failed_online_start_logs_offline_into_wandb_project(
    no_wandb_login, refusing_wandb_server, monkeypatch, caplog
):
    """README: "an online start that fails, logs offline with a warning"; WANDB_PROJECT names the project
    (else tracking.wandb_project)."""
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef" * 2 + "01234567")  # a well-formed key: the mode is online
    monkeypatch.setenv("WANDB_PROJECT", "from-the-env")
    out = no_wandb_login / "train"
    cfg = TrackingConfig(report_to=["wandb"], wandb_mode="online", wandb_project="from-the-recipe")
    assert wandb_mode(cfg) == "online"
    caplog.set_level(logging.INFO, logger="grpo.tracking")
    import wandb

    wandb.teardown()  # wandb's service process outlives a run and keeps the server address it started with
    t0 = time.perf_counter()
    try:
        tracker = Tracker(out, cfg, is_main=True, name="train")
        tracker.log(1, {"reward": 0.25})
        tracker.close()
        seconds = time.perf_counter() - t0
        monkeypatch.delenv("WANDB_PROJECT")
        offline = Tracker(
            no_wandb_login / "sft", dataclasses.replace(cfg, wandb_mode="offline"), is_main=True, name="sft"
        )
        offline.log(1, {"loss": 1.0})
        offline.close()
    finally:
        wandb.teardown()  # flushes the run files; later tests get a service with their own environment
    assert seconds < 60  # it did not hang on the server
    assert "could not start an online run" in caplog.text and "logging offline instead" in caplog.text
    assert "wandb: offline run in" in caplog.text and "wandb: online run" not in caplog.text
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    records = wandb_records(run_dir)
    (run,) = [r.run for r in records if r.HasField("run")]
    assert run.project == "from-the-env"
    history = [
        {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
        for r in records
        if r.HasField("history")
    ]
    assert [float(h["reward"]) for h in history] == [0.25]
    (run_dir,) = (no_wandb_login / "sft" / "wandb").glob("offline-run-*")
    assert [r.run.project for r in wandb_records(run_dir) if r.HasField("run")] == ["from-the-recipe"]


def test_wandb_dir_is_respected(no_wandb_login, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(no_wandb_login / "elsewhere"))
    tracker = Tracker(
        no_wandb_login / "sft", TrackingConfig(report_to=["wandb"], wandb_mode="offline"), is_main=True, name="sft"
    )
    tracker.log(1, {"loss": 1.0})
    tracker.close()
    assert list((no_wandb_login / "elsewhere" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert not (no_wandb_login / "sft" / "wandb").exists()


def test_wandb_mode_rules(no_wandb_login, monkeypatch, caplog):
    auto, online, offline = (TrackingConfig(wandb_mode=m) for m in ("auto", "online", "offline"))
    assert wandb_mode(auto) == "offline"  # no key anywhere
    assert wandb_mode(online) == "offline" and "no API key" in caplog.text  # never asks for one
    netrc = no_wandb_login / "home" / ".netrc"
    netrc.parent.mkdir(parents=True, exist_ok=True)
    netrc.write_text("machine 127.0.0.1\n  login user\n  password x\n")
    assert wandb_mode(auto) == "online"  # `wandb login` for the configured host
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    assert wandb_mode(auto) == "online"
    assert wandb_mode(offline) == "offline"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode(auto) == "offline"  # the environment decides under auto
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(online) == "disabled"  # disabled always wins
    tracker = Tracker(no_wandb_login / "x", TrackingConfig(report_to=["wandb"]), is_main=True)
    assert tracker._wandb is None
    tracker.close()


def test_secrets_are_redacted(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    assert [
        is_secret_name(n) for n in ("api_key", "hf_token", "wandbApiKey", "PASSWORD", "max_new_tokens", "tokenizer")
    ] == [True, True, True, True, False, False]
    cfg = {
        "rollout": {"max_new_tokens": 8, "stop_token_ids": [1]},
        "rewards": [{"name": "a", "token": "t", "url": f"https://x?k={SECRET}"}],
    }
    assert redact(cfg) == {
        "rollout": {"max_new_tokens": 8, "stop_token_ids": [1]},
        "rewards": [{"name": "a", "token": "<redacted>", "url": "<redacted>"}],
    }


def test_jsonl_and_samples_without_trackers(tmp_path):
    tracker = Tracker(tmp_path, TrackingConfig(), is_main=True)
    tracker.log(1, {"reward": 0.5, "bad": float("inf"), "text": "x"})
    tracker.log_table(1, "samples", ["prompt", "completion"], [["p", "c"]])
    assert tracker.close({"curves": ["missing"]}) == []  # nothing to draw
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "reward": 0.5, "bad": None, "text": None}
    assert json.loads((tmp_path / "samples.jsonl").read_text()) == {"step": 1, "prompt": "p", "completion": "c"}
    other = Tracker(tmp_path / "rank1", TrackingConfig(), is_main=False)
    other.log(1, {"reward": 1.0})
    other.log_table(1, "samples", ["prompt"], [["p"]])
    assert other.close({"c": ["reward"]}) == [] and not (tmp_path / "rank1").exists()


def test_plot_curves_groups_and_skips(tmp_path):
    history = [
        {"step": s, "loss": 1 / s, "eval_loss": 1.5 / s if s % 10 == 0 else None, "lr": 1e-3} for s in range(1, 41)
    ]
    png = plot_curves(
        history,
        [("loss", "eval_loss"), "lr", "absent"],
        tmp_path / "c.png",
        title="sft",
        hlines={"loss": (0.1, "target")},
    )
    assert png == tmp_path / "c.png" and png.stat().st_size > 10_000
    assert plot_curves(history, ["absent", ("also_absent",)], tmp_path / "none.png") is None
    assert smooth([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]


def test_a_secret_on_the_command_line_stays_out_of_wandb_metadata(no_wandb_login, monkeypatch):
    monkeypatch.setattr("sys.argv", ["grpo", "train", "recipe.yaml", f"rewards.0.api_key={SECRET}"])
    out = no_wandb_login / "train"
    tracker = Tracker(out, TrackingConfig(report_to=["wandb"], wandb_mode="offline"), is_main=True, name="train")
    tracker.log(1, {"reward": 1.0})
    tracker.close()
    files = [f for f in out.rglob("*") if f.is_file()]
    assert any(f.name.endswith(".wandb") for f in files)
    assert not [f for f in files if SECRET.encode() in f.read_bytes()]
