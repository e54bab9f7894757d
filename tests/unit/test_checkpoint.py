"""Expert-sharded checkpoints: exact round trips, partial loads, corruption, crash safety."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from expertmesh.platform import checkpoint as ckpt
from expertmesh.platform.config import ModelConfig
from expertmesh.platform.errors import CheckpointError
from expertmesh.platform.model import LocalDispatcher, MoETransformer

CFG = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, n_experts=4)


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> MoETransformer:
    torch.manual_seed(seed)
    model = MoETransformer(ModelConfig(**{**CFG, **overrides})).eval()
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def assert_same_weights(a: MoETransformer, b: MoETransformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


class OpenRecorder:
    """Wraps a pyarrow filesystem and records every path opened for reading."""

    def __init__(self, fs, opened: list[str]) -> None:
        self._fs, self._opened = fs, opened

    def open_input_stream(self, path: str):
        self._opened.append(path)
        return self._fs.open_input_stream(path)

    def open_input_file(self, path: str):
        self._opened.append(path)
        return self._fs.open_input_file(path)

    def __getattr__(self, name: str):
        return getattr(self._fs, name)


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    paths: list[str] = []
    real = ckpt._filesystem

    def recording(uri: str):
        fs, path = real(uri)
        return OpenRecorder(fs, paths), path

    monkeypatch.setattr(ckpt, "_filesystem", recording)
    return paths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    model = tiny_model(dtype=dtype)
    uri = ckpt.save_checkpoint(str(tmp_path), "step-1", model, version={"step": 1})
    assert uri == str(tmp_path / "step-1")
    loaded, manifest = ckpt.load_model(str(tmp_path))  # via latest.json
    assert_same_weights(model, loaded)
    tokens_BT = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(tokens_BT).logits, loaded(tokens_BT).logits)
    assert manifest.config == model.cfg and manifest.version == {"step": 1}


def test_selection_bias_survives_the_round_trip_and_old_checkpoints_load(tmp_path: Path) -> None:
    model = tiny_model(dtype=torch.bfloat16, balance_bias_rate=0.01)
    bias_E = torch.tensor([0.5, -0.25, 0.125, -0.375])  # steps of 1e-3 would vanish in bfloat16
    with torch.no_grad():
        model.layers[1].ffn.expert_bias.copy_(bias_E + 0.001)
    uri = ckpt.save_checkpoint(str(tmp_path), "biased", model)
    loaded, _ = ckpt.load_model(uri)
    assert_same_weights(model, loaded)
    assert loaded.layers[1].ffn.expert_bias.dtype == torch.float32
    assert torch.equal(loaded.layers[1].ffn.expert_bias, bias_E + 0.001)
    # serving: the router loads the dense part only, experts come from elsewhere; same routing
    dense_only, _ = ckpt.load_model(uri, with_experts=False)
    assert torch.equal(dense_only.layers[1].ffn.expert_bias, bias_E + 0.001)
    banks = {i: moe.experts for i, moe in loaded.moe_layers().items()}
    tokens_BT = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        want = model(tokens_BT, return_routing=True)
        got = dense_only(tokens_BT, dispatcher=LocalDispatcher(banks), return_routing=True)
    assert torch.equal(want.logits, got.logits)
    assert all(set(e) == {0, 2} for e in got.layer_stats[1].experts_per_token())  # the bias won
    for a, b in zip(want.layer_stats, got.layer_stats, strict=True):
        assert a.experts_per_token() == b.experts_per_token()

    # a checkpoint from before balance_bias_rate existed: no bias tensor, no config key
    old = ckpt.save_checkpoint(str(tmp_path), "old", tiny_model())
    manifest = json.loads((tmp_path / "old/manifest.json").read_text())
    del manifest["config"]["balance_bias_rate"]
    (tmp_path / "old/manifest.json").write_text(json.dumps(manifest))
    old_model, old_manifest = ckpt.load_model(old)
    assert old_manifest.config.balance_bias_rate == 0.0
    assert all(moe.expert_bias is None for moe in old_model.moe_layers().values())
    # ... and its weights into a model that balances from now on: the bias starts at zeros
    cfg = ModelConfig(**{**CFG, "balance_bias_rate": 0.01})
    experts = ckpt.load_experts(old, old_manifest.expert_keys()).items()
    grown = ckpt.assemble_model(cfg, ckpt.load_dense(old), experts)
    assert all(moe.expert_bias.tolist() == [0.0] * 4 for moe in grown.moe_layers().values())
    with torch.no_grad():
        assert torch.equal(grown(tokens_BT).logits, old_model(tokens_BT).logits)


def test_manifest_lists_every_file_with_checksum(tmp_path: Path) -> None:
    tok = tmp_path / "tok.json"
    tok.write_text('{"version": "1.0"}')
    model = tiny_model(tie_embeddings=True)
    uri = ckpt.save_checkpoint(
        str(tmp_path / "root"), "a", model, tokenizer_path=str(tok), train_state=b"\x00opt"
    )
    manifest = ckpt.read_manifest(uri)
    experts = {ckpt.expert_file(layer, e) for layer in range(2) for e in range(4)}
    assert (
        set(manifest.files) == {"dense.safetensors", "tokenizer.json", "train_state.pt"} | experts
    )
    for rel, entry in manifest.files.items():
        assert (Path(uri) / rel).stat().st_size == entry.size and len(entry.sha256) == 64
    assert "experts/L001/E003.safetensors" in manifest.files
    assert ckpt.read_tokenizer(uri) == tok.read_text()
    assert ckpt.load_train_state(uri) == b"\x00opt"
    assert manifest.created_at.endswith("+00:00")
    loaded, _ = ckpt.load_model(uri)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert_same_weights(model, loaded)


def test_file_uri(tmp_path: Path) -> None:
    model = tiny_model()
    root = tmp_path.as_uri()  # file:///...
    uri = ckpt.save_checkpoint(root, "a", model)
    assert uri == f"{root}/a"
    assert ckpt.resolve(root) == uri
    assert json.loads((tmp_path / "latest.json").read_text()) == {"name": "a"}
    loaded, _ = ckpt.load_model(root)
    assert_same_weights(model, loaded)
    assert ckpt.load_train_state(uri) is None and ckpt.read_tokenizer(uri) is None


def test_partial_load_opens_only_those_files(tmp_path: Path, opened: list[str]) -> None:
    model = tiny_model()
    uri = ckpt.save_checkpoint(str(tmp_path), "a", model)
    opened.clear()
    got = ckpt.load_experts(uri, [(0, 1), (1, 3)])
    assert sorted(opened) == sorted(
        f"{uri}/{rel}"
        for rel in (
            "manifest.json",
            "experts/L000/E001.safetensors",
            "experts/L001/E003.safetensors",
        )
    )
    for layer, e in [(0, 1), (1, 3)]:
        want = model.layers[layer].ffn.experts.expert_tensors(e)
        assert all(torch.equal(got[(layer, e)][k], want[k]) for k in ("w1", "w3", "w2"))
    # and with every other weight file gone it still works
    keep = {"L000/E001.safetensors", "L001/E003.safetensors"}
    for f in Path(uri).rglob("*.safetensors"):
        if f"{f.parent.name}/{f.name}" not in keep:
            f.unlink()
    assert set(ckpt.load_experts(uri, [(0, 1), (1, 3)])) == {(0, 1), (1, 3)}


def test_dense_only_load_reads_no_expert_file(tmp_path: Path, opened: list[str]) -> None:
    uri = ckpt.save_checkpoint(str(tmp_path), "a", tiny_model())
    opened.clear()
    dense_model, _ = ckpt.load_model(uri, with_experts=False)
    assert not any("/experts/" in p for p in opened)
    assert all(layer.ffn.experts is None for layer in dense_model.layers)


def test_experts_override_and_dense_only_model(tmp_path: Path) -> None:
    full = tiny_model(seed=1)
    dense_only = MoETransformer(full.cfg, with_experts=False)
    dense_only.load_state_dict(full.state_dict(), strict=False)
    with pytest.raises(ValueError, match="experts_override"):
        ckpt.save_checkpoint(str(tmp_path), "x", dense_only)
    override = {
        (layer, e): full.layers[layer].ffn.experts.expert_tensors(e)
        for layer in range(2)
        for e in range(4)
    }
    ckpt.save_checkpoint(str(tmp_path), "a", dense_only, experts_override=override)
    assert_same_weights(full, ckpt.load_model(str(tmp_path))[0])


def test_corrupt_truncated_and_missing_files_are_named(tmp_path: Path) -> None:
    uri = ckpt.save_checkpoint(str(tmp_path), "a", tiny_model())
    expert = Path(uri) / "experts/L001/E002.safetensors"
    data = bytearray(expert.read_bytes())
    data[-1] ^= 0xFF
    expert.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"L001/E002\.safetensors: corrupt"):
        ckpt.load_experts(uri, [(1, 2)])
    with pytest.raises(CheckpointError, match=r"L001/E002\.safetensors"):
        ckpt.load_model(uri)
    dense = Path(uri) / "dense.safetensors"
    dense.write_bytes(dense.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"dense\.safetensors: truncated"):
        ckpt.load_dense(uri)
    (Path(uri) / "experts/L000/E000.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"L000/E000\.safetensors: file is missing"):
        ckpt.load_experts(uri, [(0, 0)])
    with pytest.raises(CheckpointError, match=r"E009\.safetensors: checkpoint has no expert"):
        ckpt.load_experts(uri, [(0, 9)])
    (Path(uri) / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"latest\.json"):
        ckpt.resolve(str(tmp_path))
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        ckpt.resolve(str(tmp_path / "elsewhere"))


def test_crash_mid_save_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = str(tmp_path)
    old = tiny_model(seed=0)
    ckpt.save_checkpoint(root, "a", old)
    latest_before = (tmp_path / "latest.json").read_bytes()
    real_write = ckpt._Dir.write

    def crashing_write(self, rel: str, data: bytes) -> None:
        if rel == "experts/L001/E002.safetensors":
            raise OSError("disk full")
        real_write(self, rel, data)

    monkeypatch.setattr(ckpt._Dir, "write", crashing_write)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(root, "b", tiny_model(seed=1))
    assert (tmp_path / "latest.json").read_bytes() == latest_before
    assert (tmp_path / "b/experts/L000/E000.safetensors").exists()  # the crash was mid-write
    assert ckpt.resolve(root) == str(tmp_path / "a")
    assert_same_weights(old, ckpt.load_model(root)[0])
    with pytest.raises(CheckpointError):
        ckpt.read_manifest(str(tmp_path / "b"))
    assert not list(tmp_path.rglob("*.tmp-*"))
    monkeypatch.setattr(ckpt._Dir, "write", real_write)
    ckpt.save_checkpoint(root, "b", tiny_model(seed=1))  # a retry may reuse the name
    assert ckpt.resolve(root) == str(tmp_path / "b")


def test_crash_inside_a_file_write_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = ckpt._Dir(str(tmp_path))
    d.write("latest.json", b'{"name": "a"}')

    class Boom:
        def __init__(self, stream) -> None:
            self.stream = stream

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.stream.close()

        def write(self, data: bytes) -> None:
            self.stream.write(data[:3])
            raise OSError("killed")

    class KilledMidWrite:
        def __init__(self, fs) -> None:
            self._fs = fs

        def open_output_stream(self, path: str) -> Boom:
            return Boom(self._fs.open_output_stream(path))

        def __getattr__(self, name: str):
            return getattr(self._fs, name)

    monkeypatch.setattr(d, "fs", KilledMidWrite(d.fs))
    with pytest.raises(OSError, match="killed"):
        d.write("latest.json", b'{"name": "b"}')
    assert (tmp_path / "latest.json").read_bytes() == b'{"name": "a"}'
    assert not list(tmp_path.glob("*.tmp-*"))


def test_checkpoints_are_immutable(tmp_path: Path) -> None:
    ckpt.save_checkpoint(str(tmp_path), "a", tiny_model())
    with pytest.raises(CheckpointError, match="immutable"):
        ckpt.save_checkpoint(str(tmp_path), "a", tiny_model(seed=1))
    for bad in ("", "x/y", "..", "latest.json"):
        with pytest.raises(ValueError):
            ckpt.save_checkpoint(str(tmp_path), bad, tiny_model())


def test_a_reference_loads_the_same_model_from_where_the_files_lie(tmp_path: Path) -> None:
    parent = tiny_model(seed=1)
    p_uri = ckpt.save_checkpoint(str(tmp_path / "ckpt"), "parent", parent, version={"step": 1})
    child = tiny_model(seed=1)
    with torch.no_grad():
        # one expert changes; the rest is shared with the parent
        name = next(n for n, _ in child.named_parameters() if "expert" in n)
        dict(child.named_parameters())[name][0].add_(1.0)
    c_uri = ckpt.save_checkpoint(
        str(tmp_path / "ckpt"), "child", child, version={"step": 2}, parent=p_uri
    )
    ref = ckpt.write_reference(c_uri, str(tmp_path / "elsewhere" / "ref"))
    assert sorted(p.name for p in Path(ref).iterdir()) == ["manifest.json"]
    manifest = ckpt.read_manifest(ref)
    assert manifest.written_files() == []
    assert manifest.files == {
        rel: ckpt.FileEntry(sha256=e.sha256, size=e.size, path=e.path or f"{c_uri}/{rel}")
        for rel, e in ckpt.read_manifest(c_uri).files.items()
    }
    assert_same_weights(ckpt.load_model(ref)[0], child)
    # the same checksums guard the bytes: a changed file behind the reference is refused
    (own,) = [r for r in ckpt.read_manifest(c_uri).written_files() if r.startswith("experts")]
    changed = Path(c_uri) / own
    changed.write_bytes(changed.read_bytes()[:-1] + b"\0")
    with pytest.raises(CheckpointError, match=own):
        ckpt.load_model(ref)
