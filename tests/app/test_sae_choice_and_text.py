"""Which SAE a by-layer command uses (several at one layer: an error listing them, as `sae ls` shows them),
and the text `lenslab sae features` prints (WordPiece pieces joined as the tokenizer decodes them)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from _tiny_bert import make_tiny_bert
from _tiny_llama import make_tiny_llama

from analysis.errors import AmbiguousKeyError, ConfigError

WORDS = ["gaussian", "tensor", "ndarray", "dataframe", "kwargs", "broadcasting", "json", "string"]
TEXTS = [f"the {a} of a {b} returns a new {c}" for a in WORDS for b in WORDS for c in WORDS[:3]]
SAE = {"d_sae": 32, "n_tokens": 4_000, "batch_size": 256}


@pytest.fixture(scope="module")
def two_saes(tmp_path_factory):
    """Two SAEs of the tiny Llama at layer 1 (k=2 trained first, then k=4) and one at layer 0."""
    from app import api

    root = tmp_path_factory.mktemp("pick")
    llama = make_tiny_llama(root / "llama")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LENSLAB_ACTIVATIONS", str(root / "activations"))
        keys = [api.sae_train(llama, layer, k=k, texts=TEXTS, store=root / "store", **SAE).key
                for layer, k in ((1, 2), (1, 4), (0, 2))]
    return SimpleNamespace(llama=llama, store=root / "store", keys=keys)


def test_api_refuses_to_guess_between_saes_of_one_layer(two_saes):
    from app import api

    listed = api.sae_list(store=two_saes.store)
    at_1 = listed[listed["layer"] == 1]
    assert len(at_1) == 2
    with pytest.raises(AmbiguousKeyError) as info:
        api.find_sae(two_saes.llama, 1, store=two_saes.store)
    msg = str(info.value)
    assert isinstance(info.value, ConfigError)
    assert msg.startswith(f"2 SAEs of {Path(two_saes.llama).resolve()} are stored at layer 1: ")
    for key, name in zip(at_1["key"], at_1["name"]):  # each as `sae ls` prints it: 12-character key and name
        assert f"{key[:12]} {name}" in msg
    assert "--sae KEY (API: key=KEY)" in msg and f"--sae {two_saes.keys[1][:12]} for the newest" in msg
    # a key picks one; a layer with one SAE needs none
    assert api.find_sae(two_saes.llama, 1, two_saes.keys[0][:8], store=two_saes.store) == two_saes.keys[0]
    assert api.find_sae(two_saes.llama, 0, store=two_saes.store) == two_saes.keys[2]


def test_cli_lists_the_keys_sae_ls_shows(two_saes, capsys):
    from app.cli import app
    from app.cli.exit_codes import run

    assert run(app, ["sae", "ls", "--json", "--store", str(two_saes.store)]) == 0
    ls = json.loads(capsys.readouterr().out)
    assert run(app, ["sae", "eval", str(two_saes.llama), "--layer", "1", "--no-loss", "--store",
                     str(two_saes.store)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "Traceback" not in out.err
    [line] = out.err.splitlines()  # one line, however long (stderr is not a terminal here)
    for row in ls:
        assert (f"{row['key'][:12]} {row['name']}" in line) == (row["layer"] == 1)
    assert "pick one with --sae KEY" in line
    assert run(app, ["sae", "eval", str(two_saes.llama), "--layer", "1", "--no-loss", "--sae", two_saes.keys[0][:12],
                     "--texts", str(_texts_file(two_saes.store.parent, TEXTS[:40])), "--json", "--store",
                     str(two_saes.store)]) == 0
    assert json.loads(capsys.readouterr().out)["key"] == two_saes.keys[0]


def _texts_file(d: Path, texts: list[str]) -> Path:
    path = d / "texts.txt"
    path.write_text("\n".join(texts))
    return path


# -- text of the feature contexts -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A random 2-layer BERT with MiniLM's WordPiece tokenizer, bootable offline."""
    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "model")


def test_features_cli_prints_contexts_as_the_tokenizer_decodes_them(tiny_bert, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from app import api
    from app.cli import app

    monkeypatch.setenv("LENSLAB_ACTIVATIONS", str(tmp_path / "activations"))
    store = tmp_path / "store"
    key = api.sae_train(tiny_bert, 1, k=4, texts=TEXTS, store=store, **SAE).key
    fd = api.sae_features(key, texts=TEXTS, store=store)
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    assert fd.meta["wordpiece"] is True
    feature = next(i for i in range(fd.d_sae) if any("##" in "".join(c.tokens) for c in fd.contexts(i)))
    res = CliRunner().invoke(app, ["sae", "features", str(tiny_bert), "--layer", "1", "-f", str(feature), "--top",
                                   "10", "--texts", str(_texts_file(tmp_path, TEXTS)), "--store", str(store)])
    assert res.exit_code == 0, res.output
    printed = [ln for ln in res.stdout.splitlines() if re.match(r"^\s+-?\d+\.\d{3}  ", ln)]
    contexts = fd.contexts(feature)
    assert len(printed) == len(contexts) > 0
    for line, ctx in zip(printed, contexts):
        text = re.sub(r"^\s*-?\d+\.\d{3}  ", "", line)
        decoded = tok.decode(tok.convert_tokens_to_ids(ctx.tokens), clean_up_tokenization_spaces=False)
        assert text.replace("[[", "").replace("]]", "") == decoded  # the tokenizer's own text, marks aside
        assert text.count("[[") == 1
    assert any("##" in "".join(c.tokens[1:]) for c in contexts)  # pieces were joined, not printed run together
    res = CliRunner().invoke(app, ["sae", "features", str(tiny_bert), "--layer", "1", "-f", str(feature), "--top",
                                   "10", "--texts", str(_texts_file(tmp_path, TEXTS)), "--store", str(store), "--json"])
    assert [c["text"] for c in json.loads(res.stdout)["feature"]["contexts"]] == [
        tok.decode(tok.convert_tokens_to_ids(c.tokens), clean_up_tokenization_spaces=False) for c in contexts]
