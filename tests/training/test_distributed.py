"""The pieces that make several processes compute what one does, checked in one process: prompt
shares, per-rank batch sizes, random draws split across ranks, the batch std over all ranks,
and the DeepSpeed config checks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from vlreason.config import ConfigError, load_config
from vlreason.rl import group_advantages
from vlreason.rollout.hf import sample_rows
from vlreason.training.distributed import Processes
from vlreason.training.preflight import stage_inputs
from vlreason.training.update import deepspeed_config


@pytest.mark.parametrize(("n", "world", "sizes"), [(8, 2, [4, 4]), (5, 2, [3, 2]), (1, 2, [1, 0]), (7, 3, [3, 2, 2])])
def test_shares_are_contiguous_cover_everything_and_differ_by_at_most_one(n, world, sizes):
    shares = [Processes(rank=r, world_size=world).shard(n) for r in range(world)]
    assert [s.stop - s.start for s in shares] == sizes
    assert [i for s in shares for i in range(n)[s]] == list(range(n))


def test_a_global_batch_must_split_evenly_over_the_processes():
    assert Processes(rank=0, world_size=4).per_rank(16, "optim.batch_size") == 4
    with pytest.raises(ConfigError, match=r"optim.batch_size: 6 does not split evenly over 4 processes.*multiple of 4"):
        Processes(rank=1, world_size=4).per_rank(6, "optim.batch_size")


def test_one_process_collectives_are_the_identity():
    one = Processes()
    assert one.sum([1, 2.5]) == [1.0, 2.5] and one.max([3]) == [3.0] and one.gather("x") == ["x"]
    assert one.on_main(lambda: 7) == 7


def test_a_share_of_a_draw_gets_the_tokens_the_whole_draw_gives_its_rows():
    probs = torch.rand(6, 50)
    whole = sample_rows(probs, torch.Generator().manual_seed(4))
    first = sample_rows(probs[:4], torch.Generator().manual_seed(4), share=(torch.arange(0, 4), 6))
    second = sample_rows(probs[4:], torch.Generator().manual_seed(4), share=(torch.arange(4, 6), 6))
    assert torch.equal(torch.cat([first, second]), whole)


def test_the_batch_std_can_come_from_every_process():
    rewards = torch.tensor([0.0, 1.0, 2.0, 4.0])
    whole = group_advantages(rewards, 2, "batch")
    shares = [group_advantages(rewards[i:i + 2], 2, "batch", batch_rewards=rewards) for i in (0, 2)]
    torch.testing.assert_close(torch.cat(shares), whole)


def stage(tmp_path, **optim):
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "a", "messages": [{"role": "user", "content": "hi"}, '
                    '{"role": "assistant", "content": "yo"}]}\n')
    raw = {"output_dir": str(tmp_path / "out"), "data": {"train": str(data)},
           "stages": [{"kind": "sft", "optim": optim}]}
    return load_config(None, raw=raw).stages[0]


def test_a_deepspeed_file_that_is_missing_or_not_json_stops_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\[sft\].optim.deepspeed .*nope.json: cannot read it"):
        stage_inputs(stage(tmp_path, deepspeed="nope.json"))
    (tmp_path / "bad.json").write_text("{stage: 2")
    with pytest.raises(ConfigError, match="not valid JSON"):
        stage_inputs(stage(tmp_path, deepspeed=str(tmp_path / "bad.json")))


def test_vlreason_owns_precision_clipping_and_micro_batches_in_the_deepspeed_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "z.json").write_text('{"zero_optimization": {"stage": 2}, "gradient_clipping": 9, '
                                     '"train_batch_size": 64}')
    optim = stage(tmp_path, deepspeed="z.json", max_grad_norm=0.5).optim
    assert optim.deepspeed == str(tmp_path / "z.json")  # absolute, like every path in a config
    config = deepspeed_config(optim, torch.bfloat16, micro_batch=3)
    assert config["zero_optimization"] == {"stage": 2} and "train_batch_size" not in config
    assert config["gradient_clipping"] == 0.5 and config["bf16"] == {"enabled": True}
    assert config["train_micro_batch_size_per_gpu"] == 3 and config["gradient_accumulation_steps"] == 1


ENDING = '''
import atexit, logging, os, sys
import torch.distributed as dist
from vlreason.training.distributed import end_launched_process

os.environ.update(RANK="0", WORLD_SIZE=sys.argv[1], MASTER_ADDR="127.0.0.1", MASTER_PORT="29599")
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
atexit.register(lambda: print("interpreter teardown ran"))
logging.basicConfig(level=logging.INFO)
logging.getLogger("run").info("logged before the end")
print("printed before the end", end="")
end_launched_process(3)
print(" / end_launched_process returned")
'''


def test_a_launched_process_ends_with_its_code_its_output_flushed_and_no_teardown():
    ended = subprocess.run([sys.executable, "-c", ENDING, "2"], capture_output=True, text=True, timeout=120)
    assert ended.returncode == 3
    assert ended.stdout == "printed before the end" and "logged before the end" in ended.stderr
    # one process (or main() called in-process): it returns and the interpreter ends as usual
    single = subprocess.run([sys.executable, "-c", ENDING, "1"], capture_output=True, text=True, timeout=120)
    assert single.returncode == 0
    assert single.stdout == "printed before the end / end_launched_process returned\ninterpreter teardown ran\n"
