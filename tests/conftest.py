"""Suite-wide test settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread(monkeypatch):
    """Tiny models run faster on one thread than on two contending ones (measured: 4m51s -> 35s for the
    Perceiver tests on a loaded 2-core machine); every test gets one and the setting is restored.
    OMP_NUM_THREADS=1 keeps ``threads: 0`` (auto, `vlm.threads`) of the commands a test runs at one too."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_base_on_disk(tmp_path_factory):
    """The tiny base parts as files (open_clip weights file, Llama directory with its tokenizer) and a
    config naming them: what a user's own local weights look like."""
    from vlm.testing import tiny_parts, tiny_vlm_config

    root = tmp_path_factory.mktemp("tiny_base")
    clip_model, _, lm, tokenizer = tiny_parts("llama")
    torch.save(clip_model.state_dict(), root / "clip.pt")
    lm.save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    config = tiny_vlm_config("llama")
    config.vision.pretrained = str(root / "clip.pt")
    config.lm.name_or_path = str(root / "lm")
    return root, config


@pytest.fixture(scope="session")
def tiny_adapter(tiny_base_on_disk):
    """A trained-adapter directory whose base parts are on disk, so ``load_trained``/``pvlm-caption
    --adapter`` load it like a real one."""
    import copy

    from vlm import VisionLanguageModel
    from vlm.testing import tiny_parts

    root, config = tiny_base_on_disk
    clip_model, preprocess, lm, tokenizer = tiny_parts("llama")
    config = copy.deepcopy(config)
    config.max_new_tokens = 6
    model = VisionLanguageModel.from_parts(clip_model, lm, tokenizer, config, preprocess=preprocess)
    return model.save_adapter(root / "adapter")
