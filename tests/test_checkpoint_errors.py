"""A malformed checkpoint file gives an error that names the file and the field, never a raw library exception."""
import json
import pickle
import re
import shutil

import pytest

from hf_reference import save_tiny_hf
from minigmr.config import Config
from minigmr.model import Qwen25VL
from minigmr.processor import ImageProcessor, Processor
from minigmr.scoring import Reranker
from oracles import make_tiny_tokenizer_dir, write_preprocessor_config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    save_tiny_hf(path, seed=0, vision_depth=2, fullatt=(1,), text_layers=2)
    make_tiny_tokenizer_dir(path)
    write_preprocessor_config(path)
    return path


@pytest.fixture
def copy(ckpt, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt, dst)
    return dst


def edit_config(folder, change):
    cfg = json.loads((folder / "config.json").read_text())
    change(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("content,message", [
    ("[1, 2]", "expected a JSON object, got list"),
    ('"hello"', "expected a JSON object, got str"),
    ("{", "not valid JSON"),
    (b"{\"a\": \"\xff\"}", "not valid JSON"),  # not UTF-8
])
def test_config_json_that_is_not_an_object(copy, content, message):
    target = copy / "config.json"
    target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(target)) + ".*" + message):
        Config.from_json(str(copy))


def set_text(key, value):
    def change(cfg):
        (cfg["text_config"] if "text_config" in cfg and key in cfg["text_config"] else cfg)[key] = value
    return change


def set_vision(key, value):
    return lambda cfg: cfg["vision_config"].__setitem__(key, value)


@pytest.mark.parametrize("change,message", [
    (set_text("hidden_size", "128"), r"hidden_size must be a JSON int, got '128'"),
    (set_text("hidden_size", 128.0), r"hidden_size must be a JSON int, got 128.0"),
    (set_text("num_hidden_layers", None), r"num_hidden_layers must be a JSON int, got None"),
    (set_text("num_hidden_layers", 0), r"num_hidden_layers must be > 0, got 0"),
    (set_text("rms_norm_eps", "x"), r"rms_norm_eps must be a JSON number, got 'x'"),
    (lambda cfg: cfg.__setitem__("tie_word_embeddings", "false"), r"tie_word_embeddings must be a JSON bool, got 'false'"),
    (set_text("hidden_act", "gelu"), r"hidden_act 'gelu' is not implemented"),
    (set_text("image_token_id", "x"), r"image_token_id must be a JSON int, got 'x'"),
    (set_vision("depth", "4"), r"vision_config.depth must be a JSON int, got '4'"),
    (set_vision("window_size", 0), r"vision_config.window_size must be > 0, got 0"),
    (set_vision("fullatt_block_indexes", "13"), r"vision_config.fullatt_block_indexes must be a list of integers"),
    (lambda cfg: cfg.__setitem__("vision_config", [1]), r"'vision_config' must be a JSON object, got \[1\]"),
    (lambda cfg: cfg.__setitem__("rope_scaling", [1]), r"'rope_scaling' must be a JSON object"),
    (lambda cfg: cfg.__setitem__("torch_dtype", "bogus"), r"torch_dtype 'bogus' is not one of"),
    (set_vision("out_hidden_size", 8), r"out_hidden_size 8 != text hidden_size"),
])
def test_config_field_errors_name_file_and_field(copy, change, message):
    cfg = json.loads((copy / "config.json").read_text())
    if "torch_dtype" not in cfg and "dtype" in cfg:  # transformers 5 writes "dtype"; test the key it wrote
        cfg.pop("dtype")
    (copy / "config.json").write_text(json.dumps(cfg))
    edit_config(copy, change)
    with pytest.raises(ValueError, match=re.escape(str(copy / "config.json")) + ": .*" + message):
        Config.from_json(str(copy))


def test_the_unedited_config_loads(copy):
    assert Config.from_json(str(copy)).text.num_hidden_layers == 2


@pytest.mark.parametrize("content", ["{", "[1, 2]", ""])
def test_tokenizer_json_that_is_not_a_tokenizer(copy, content):
    (copy / "tokenizer.json").write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(copy / "tokenizer.json")) + ": not a tokenizers JSON file"):
        Processor.from_pretrained(str(copy))


@pytest.mark.parametrize("content,message", [
    ("[1]", "expected a JSON object"),
    ('{"size": [1, 2]}', "expected a JSON object"),
    ("{", "not valid JSON"),
])
def test_preprocessor_config_errors_name_the_file(copy, content, message):
    (copy / "preprocessor_config.json").write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(copy / "preprocessor_config.json")) + ": " + message):
        ImageProcessor.from_pretrained(str(copy))


@pytest.mark.parametrize("change,message", [
    ({"min_pixels": "3136"}, r"min_pixels must be a positive integer, got '3136'"),
    ({"image_std": [0, 0, 0]}, r"image_std must be > 0"),
    ({"image_mean": "abc"}, r"image_mean and image_std need 3 numbers"),
    ({"patch_size": 0}, r"patch_size must be a positive integer, got 0"),
])
def test_preprocessor_config_fields_are_checked(copy, change, message):
    cfg = json.loads((copy / "preprocessor_config.json").read_text())
    cfg.update(change)
    (copy / "preprocessor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=re.escape(str(copy / "preprocessor_config.json")) + ": " + message):
        ImageProcessor.from_pretrained(str(copy))


@pytest.mark.parametrize("index,message", [
    ("[1]", "not a valid safetensors index"),
    ('{"weight_map": ["a"]}', "'weight_map' must map tensor names to shard file names"),
    ('{"weight_map": {"x": "../other/model.safetensors"}}', "shard names must be plain file names"),
])
def test_shard_index_errors(copy, index, message):
    (copy / "model.safetensors").unlink()
    (copy / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match=re.escape(str(copy / "model.safetensors.index.json")) + ": " + message):
        Qwen25VL.from_pretrained(str(copy))


class Payload:
    """Unpickling this runs code: it creates the marker file."""
    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickled_checkpoint_is_never_unpickled(copy, tmp_path):
    marker = tmp_path / "payload-ran"
    Payload.marker = marker
    with open(copy / "pytorch_model.bin", "wb") as f:
        pickle.dump(Payload(), f)
    pickle.loads(pickle.dumps(Payload()))  # the payload does fire when unpickled
    assert marker.exists()
    marker.unlink()
    (copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        Qwen25VL.from_pretrained(str(copy))
    with pytest.raises(FileNotFoundError):
        Reranker.from_pretrained(str(copy))
    assert not marker.exists()


def test_dtype_and_device_arguments(ckpt):
    with pytest.raises(TypeError, match=r"dtype must be a torch.dtype such as torch.bfloat16, got 'float32'"):
        Reranker.from_pretrained(str(ckpt), dtype="float32")
    with pytest.raises(RuntimeError, match="nope"):
        Reranker.from_pretrained(str(ckpt), device="nope")
