"""
The test suite: `bash run.sh --tests` (or `python -m pytest test_all.py` inside .venv).
One section per script; every test is named test_<section>_..., which is how run.sh times the sections.
Shared fixtures sit at the top. Tests use tiny models and the offline mirror in ../shared/data (or $NANOCHAT_MIRROR).
"""
import os
import sys
import json
import shutil
import subprocess

import pytest
import torch

REPO = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, REPO)
MIRROR = os.environ.get("NANOCHAT_MIRROR") or os.path.join(REPO, "..", "shared", "data")
MIRROR = os.path.abspath(MIRROR) if not MIRROR.startswith("http") else MIRROR
SHARD_DIR = os.path.join(MIRROR, "huggingface.co", "datasets", "karpathy", "fineweb-edu-100b-shuffle", "resolve", "main")
TEST_VOCAB = 1024  # small trained vocabulary for the fixtures (256 bytes + 759 merges + 9 specials)

import common  # noqa: E402
common.set_mirror(MIRROR)


def run_script(args, env=None, timeout=600, check=True, cwd=REPO, input=None):
    """Run `python <args>` in a subprocess with this interpreter; returns CompletedProcess (text)."""
    full_env = dict(os.environ, **(env or {}))
    p = subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, input=input)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\nSTDOUT:\n{p.stdout[-4000:]}\nSTDERR:\n{p.stderr[-4000:]}")
    return p


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    """A session-wide NANOCHAT_BASE_DIR with train shards 0-1 and the validation shard copied from the mirror."""
    path = str(tmp_path_factory.mktemp("nanochat_base"))
    os.environ["NANOCHAT_BASE_DIR"] = path
    os.makedirs(os.path.join(path, "base_data"))
    for i in (0, 1, common.VAL_SHARD_INDEX):
        name = f"shard_{i:05d}.parquet"
        shutil.copy(os.path.join(SHARD_DIR, name), os.path.join(path, "base_data", name))
    return path


@pytest.fixture(scope="session")
def tokenizer(base_dir):
    """A small BPE (vocab TEST_VOCAB) trained by our trainer on the first train documents, saved under the base dir."""
    from tokenizer import Tokenizer, train_bpe, get_tokenizer
    docs = [d[:5000] for _, d in zip(range(200), common.iter_documents("train"))]
    ranks = train_bpe(docs, TEST_VOCAB)
    Tokenizer.from_ranks(ranks).save(os.path.join(base_dir, "tokenizer"))
    return get_tokenizer()


@pytest.fixture(scope="session")
def tiny_config(tokenizer):
    from model import GPTConfig
    return GPTConfig(sequence_len=128, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2, n_embd=64)


@pytest.fixture
def tiny_model(tiny_config):
    from model import GPT
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(tiny_config)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


# =============================================================================
# common.py
# =============================================================================

def test_common_mirror_resolution(tmp_path, monkeypatch):
    url = "https://huggingface.co/datasets/cais/mmlu/resolve/refs%2Fconvert%2Fparquet/all/test/0000.parquet"
    monkeypatch.chdir(tmp_path)
    try:
        common.set_mirror("rel/mirror")
        assert common.resolve_url(url) == os.path.join(str(tmp_path), "rel/mirror", "huggingface.co",
                                                       "datasets/cais/mmlu/resolve/refs/convert/parquet/all/test/0000.parquet")
        monkeypatch.chdir("/")  # resolved once: a later chdir changes nothing
        assert common.resolve_url(url).startswith(str(tmp_path))
        common.set_mirror("http://127.0.0.1:9/")
        assert common.resolve_url(url) == "http://127.0.0.1:9/huggingface.co/datasets/cais/mmlu/resolve/refs%2Fconvert%2Fparquet/all/test/0000.parquet"
        common.set_mirror(None)
        assert common.resolve_url(url) == url
    finally:
        common.set_mirror(MIRROR)


def test_common_atomic_write_keeps_old_file_on_crash(tmp_path):
    path = str(tmp_path / "f.txt")
    common.atomic_write_text(path, "good")

    def crash(f):
        f.write(b"half")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        common.atomic_write(path, crash)
    assert open(path).read() == "good"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_common_shards_and_report(base_dir):
    train, val = common.list_shards("train"), common.list_shards("val")
    assert [os.path.basename(p) for p in val] == ["shard_01822.parquet"]
    assert len(train) == 2 and val[0] not in train
    rank0 = {d for _, _, texts in common.iter_row_groups("train", 0, 2) for d in texts}
    rank1 = {d for _, _, texts in common.iter_row_groups("train", 1, 2) for d in texts}
    assert rank0 and rank1 and not rank0 & rank1
    common.write_report_section("Some Stage", [{"loss": 1.234567, "tokens": 123456, "name": "x"}, "free text"])
    text = open(os.path.join(base_dir, "report", "some-stage.md")).read()
    assert text.startswith("## Some Stage\ntimestamp: ") and "- loss: 1.2346" in text and "- tokens: 123,456" in text and "free text" in text
    common.append_log("teststage", {"step": 1, "train_loss": 2.0})
    assert json.loads(open(os.path.join(base_dir, "report", "teststage_log.jsonl")).read().splitlines()[-1])["step"] == 1
