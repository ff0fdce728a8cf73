"""Shard sets read from URLs: a local HTTP server on 127.0.0.1 that drops a connection mid-shard, a
404, and a pipe: command (WebDataset's conventions, read through webdataset.gopen)."""
import http.server
import json
import shutil
import subprocess
import sys
import threading
from functools import partial

import numpy as np
import pytest

from gam_pretrain.data import PrepError, ShardLoader, ShardSet
from gam_pretrain.data.prep import verify
from gam_pretrain.data.remote import RemoteReadError, file_url
from gam_pretrain.data.shards import _EpochOrder

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http(s) with curl")


class Handler(http.server.SimpleHTTPRequestHandler):
    drop_first: set = set()  # file names whose first request is cut off halfway
    requests: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        type(self).requests.append(name)
        if name in self.drop_first and type(self).requests.count(name) == 1:
            with open(self.translate_path(self.path), "rb") as f:
                data = f.read()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # the connection drops mid-shard
            return
        super().do_GET()


@pytest.fixture
def serve(tmp_path):
    servers = []

    def start(folder, drop_first=()):
        Handler.drop_first, Handler.requests = set(drop_first), []
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(folder.parent)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/{folder.name}"

    yield start
    for server in servers:
        server.shutdown()


def first_train_shard(data: ShardSet) -> str:
    return _EpochOrder(data.shards("train"), seed=0, epoch=0).shards[0][1]["path"]


def epoch(data: ShardSet) -> list[bytes]:
    loader = ShardLoader(data, "train", 16, seed=0, num_workers=0)
    return [b"".join(x.numpy().tobytes() for x, _ in loader.next_step()) for _ in range(loader.steps_per_epoch)]


def test_a_connection_dropped_mid_shard_is_read_again_and_the_samples_are_the_local_ones(prepared_tiny, serve):
    shard = first_train_shard(prepared_tiny)
    url = serve(prepared_tiny.path, drop_first=[shard])
    remote = ShardSet(url)
    assert remote.manifest == prepared_tiny.manifest and remote.tokenizer_bytes() == prepared_tiny.tokenizer_bytes()
    assert epoch(remote) == epoch(prepared_tiny)
    assert Handler.requests.count(shard) == 2  # cut off once, read again
    verify(url, log=lambda *a: None)


def test_a_missing_shard_ends_training_in_one_line_naming_it(prepared_tiny, serve, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(prepared_tiny.path, served)
    shard = first_train_shard(prepared_tiny)
    (served / shard).unlink()
    url = serve(served)
    with pytest.raises(PrepError, match=rf"shard {url}/{shard} cannot be read .*HTTP error"):
        ShardSet(url).read(next(s for s in prepared_tiny.shards("train") if s["path"] == shard))
    run = subprocess.run(
        [sys.executable, "-m", "gam_pretrain", "train", f"data.dir={url}", "model.vocab_size=512", "model.block_size=32",
         "model.d_model=32", "model.n_layers=2", "model.memory_slots=16", "train.batch_size=16", "train.max_steps=3",
         "train.eval_interval=0", "train.eval_batches=0", "logging.wandb=disabled", "train.progress=false",
         f"train.out_dir={tmp_path / 'runs'}", "train.run_name=r", "checkpoint.interval_steps=1"],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and f"{url}/{shard}" in errors[0] and "Traceback" not in run.stderr, run.stderr[-2000:]
    # the checkpoints written before the failing step are complete and verified; nothing half written
    from gam_pretrain.train.checkpoint import complete_checkpoints, verify_checkpoint

    run_dir = tmp_path / "runs" / "r"
    complete = complete_checkpoints(run_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == sorted(p.name for _, p in complete)
    for _, path in complete:
        verify_checkpoint(path)


def test_pipe_locations_read_through_a_command_and_refuse_unplain_names(prepared_tiny):
    remote = ShardSet(f"pipe:cat {prepared_tiny.path}/{{file}}")
    shard = prepared_tiny.shards("train")[0]
    np.testing.assert_array_equal(remote.read(shard), prepared_tiny.read(shard))
    with pytest.raises(RemoteReadError, match="not a plain file name"):
        file_url("pipe:cat {file}", "x; rm -rf /")
    with pytest.raises(PrepError, match="needs {file}"):
        ShardSet(f"pipe:cat {prepared_tiny.path}/manifest.json")
    garbled = json.loads(json.dumps(prepared_tiny.manifest))
    assert garbled["splits"]["train"]["shards"][0]["path"] == shard["path"]
