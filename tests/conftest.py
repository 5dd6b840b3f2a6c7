"""Suite-wide test settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run faster on one thread than on two contending ones (measured: 4m51s -> 35s for the
    Perceiver tests on a loaded 2-core machine); every test gets one and the setting is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory):
    """A trained-adapter directory whose base parts are on disk (tiny open_clip weights file, tiny Llama
    directory with its tokenizer), so ``load_trained``/``pvlm-caption --adapter`` load it like a real one."""
    from vlm import VisionLanguageModel
    from vlm.testing import tiny_parts, tiny_vlm_config

    root = tmp_path_factory.mktemp("tiny_adapter")
    clip_model, preprocess, lm, tokenizer = tiny_parts("llama")
    torch.save(clip_model.state_dict(), root / "clip.pt")
    lm.save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    config = tiny_vlm_config("llama")
    config.vision.pretrained = str(root / "clip.pt")
    config.lm.name_or_path = str(root / "lm")
    config.max_new_tokens = 6
    model = VisionLanguageModel.from_parts(clip_model, lm, tokenizer, config, preprocess=preprocess)
    return model.save_adapter(root / "adapter")
