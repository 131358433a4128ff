import os
import queue
import re
import subprocess
import sys
import threading
import time

import pytest
import torch

# tests import the top-level modules (unifluid, vae, train, sample, data) from the repo root
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# One intra-op thread: the test models are tiny (per-op overhead dominates), and when another process
# shares the 2 cores, OpenMP barriers with 2 threads slow small ops down by 100x. The command-line
# tools the tests launch as subprocesses keep their own default.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory):
    """An untrained small VAE (32 px -> 8x8x4 latents): training speed does not depend on its quality."""
    from vae import AutoencoderKL, VAEConfig, save_vae
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("vae") / "vae.pt")
    save_vae(AutoencoderKL(VAEConfig.preset("shapes", ch=8, norm_groups=4)), path)
    return path


@pytest.fixture
def diverge_at(monkeypatch):
    """diverge_at(steps, max_bad=5): train.py's steps in `steps` get a NaN loss and NaN gradients, as a
    diverging run does, and a run stops after max_bad such steps in a row. `steps` may also map steps
    to how they go bad: "nan" (loss and gradients), "inf" (both), "grad_nan" (gradients only)."""
    import train

    def setup(steps, max_bad=5):
        real, kinds = train.accumulate_gradients, steps if isinstance(steps, dict) else dict.fromkeys(steps, "nan")

        def diverging(run, step):
            stats = real(run, step)
            kind = kinds.get(step)
            if kind is not None:
                bad = float("inf") if kind == "inf" else float("nan")
                if kind != "grad_nan":
                    stats[0] = bad
                for p in run.raw_model.parameters():
                    if p.grad is not None:
                        p.grad.fill_(bad)
            return stats
        monkeypatch.setattr(train, "accumulate_gradients", diverging)
        monkeypatch.setattr(train, "MAX_BAD_STEPS", max_bad)
    return setup


class Child:
    """A subprocess whose stdout and stderr threads read line by line (unbuffered), so that every wait on
    it has a deadline and fails the test when it passes, instead of hanging the suite."""
    running = []

    def __init__(self, argv, env=None, **kw):
        env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
        self.lines, self.out, self.err = queue.Queue(), [], []
        self.threads = [threading.Thread(target=self._read, args=(f, keep, q), daemon=True)
                        for f, keep, q in ((self.proc.stdout, self.out, self.lines), (self.proc.stderr, self.err, None))]
        for t in self.threads:
            t.start()
        Child.running.append(self)

    @staticmethod
    def _read(f, keep, q):
        for line in f:
            keep.append(line)
            if q is not None:
                q.put(line)
        if q is not None:
            q.put(None)                  # end of output

    def wait_for(self, pattern, timeout):
        """The first stdout line from now on that matches the regex `pattern`; fails after `timeout` s."""
        end = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.proc.kill()
                pytest.fail(f"the child did not print /{pattern}/ within {timeout} s (exit {self.proc.poll()}); "
                            f"stderr: {''.join(self.err)[-2000:]}")
            if re.search(pattern, line):
                return line

    def finish(self, timeout):
        """(exit code, stdout, stderr) once it exits; fails after `timeout` s."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"the child did not exit within {timeout} s; stderr: {''.join(self.err)[-2000:]}")
        for t in self.threads:
            t.join(timeout)
        return self.proc.returncode, "".join(self.out), "".join(self.err)


@pytest.fixture(scope="session")
def child():
    """child(argv, env=..., cwd=...) -> a Child; any still running at the end of the session is killed."""
    yield Child
    for c in Child.running:
        if c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait()
