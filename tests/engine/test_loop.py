import pytest
import torch

from unsupseg.engine import Dist, GeneratorState, Stage, run_stage
from unsupseg.errors import Interrupted, RunDirError


def _stage(total, steps_per_epoch=4, fail_at=None, checkpoint_every=2):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(16, 3, generator=torch.Generator().manual_seed(2))

    def batches(epoch):
        order = torch.randperm(16, generator=torch.Generator().manual_seed(epoch))
        return [order[i * 4 : (i + 1) * 4] for i in range(steps_per_epoch)]

    def step(i, idx):
        if fail_at is not None and i == fail_at:
            raise KeyboardInterrupt
        noise = torch.randn(len(idx), 1, generator=gen)
        loss = ((model(data[idx]) - noise) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": float(loss), "images": len(idx)}

    stage = Stage("s", total, steps_per_epoch, batches, step, {"model": model, "opt": opt, "gen": GeneratorState(gen)},
                  checkpoint_every=checkpoint_every)
    return stage, model


def test_resumed_run_ends_with_the_same_weights(tmp_path):
    straight, model_a = _stage(10)
    run_stage(straight, None, Dist())

    interrupted, _ = _stage(10, fail_at=7)
    with pytest.raises(Interrupted, match=r"^interrupted; rerun the same command to resume from step 6/10 of s$"):
        run_stage(interrupted, tmp_path, Dist())
    assert torch.load(tmp_path / "s.pt", weights_only=True)["step"] == 6
    resumed, model_b = _stage(10)
    logs = run_stage(resumed, tmp_path, Dist())
    assert len(logs) == 4     # steps 6..9 only
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()):
        assert torch.equal(a, b)
    # a finished stage is skipped
    again, _ = _stage(10)
    assert run_stage(again, tmp_path, Dist()) == []


class _CtrlCWhileSaved:
    """A stateful object that Ctrl-C interrupts while it is being saved for the ``nth`` time."""

    def __init__(self, nth):
        self.saves, self.nth = 0, nth

    def state_dict(self):
        self.saves += 1
        if self.saves == self.nth:
            raise KeyboardInterrupt
        return {"saves": self.saves}

    def load_state_dict(self, state):
        self.saves = state["saves"]


def test_ctrl_c_while_a_checkpoint_is_written_names_the_one_on_disk(tmp_path):
    # checkpoints after steps 2, 4, 6; Ctrl-C lands while the one of step 6 is written: a rerun resumes from 4
    stage, _ = _stage(10)
    stage.state["probe"] = _CtrlCWhileSaved(nth=3)
    with pytest.raises(Interrupted, match=r"^interrupted; rerun the same command to resume from step 4/10 of s$"):
        run_stage(stage, tmp_path, Dist())
    assert torch.load(tmp_path / "s.pt", weights_only=True)["step"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["s.pt"]     # no half-written file left beside it


def test_unreadable_checkpoint_names_the_file(tmp_path):
    (tmp_path / "s.pt").write_bytes(b"not a checkpoint")
    stage, _ = _stage(4)
    with pytest.raises(RunDirError, match="s.pt"):
        run_stage(stage, tmp_path, Dist())
