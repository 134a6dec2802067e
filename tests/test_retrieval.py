"""Retrieval augmentation: exact nearest captions, a swappable datastore, and the API returning what it retrieved."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.api import Captioner
from captioner.retrieval import Datastore, RetrievalModule, prompt
from captioner.train import run
from conftest import compose_train


class FixedText:
    """A text tower with given embeddings (one per caption, by position in `table`)."""

    def __init__(self, table: dict[str, list[float]]):
        self.table = table

    def encode_text(self, texts):
        return torch.tensor([self.table[t] for t in texts])


def test_search_is_exact_cosine_top_k_and_skips_the_images_own_captions(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 8))
    captions = [f"caption {i}" for i in range(50)]
    image_ids = [i // 5 for i in range(50)]  # 10 images, 5 captions each
    store = Datastore.build(tmp_path / "ds", captions, image_ids, FixedText(dict(zip(captions, vectors.tolist()))))
    store = Datastore.open(tmp_path / "ds")  # what was written reads back
    queries = rng.normal(size=(4, 8))
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = queries / np.linalg.norm(queries, axis=1, keepdims=True) @ unit.T
    expected = [[captions[j] for j in np.argsort(-row)[:3]] for row in sims]
    assert store.search(torch.tensor(queries), 3) == expected
    nearest_images = [image_ids[int(np.argmax(row))] for row in sims]
    excluded = store.search(torch.tensor(queries), 3, exclude=nearest_images)
    for row, own in zip(excluded, nearest_images):
        assert all(image_ids[captions.index(c)] != own for c in row)
    with pytest.raises(ValueError, match="another CLIP"):
        store.search(torch.zeros(1, 5), 3)


def test_prompt_is_smallcaps():
    assert prompt(["a red circle.", "a blue square"]) == "Similar images show a red circle. a blue square. This image shows"


@pytest.fixture(scope="module")
def retrieval_ckpt(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("retrieval")
    cfg = compose_train(out / "run", data_dir, ["experiment=[smoke,retrieval]", "score=false", "trainer.max_epochs=2"])
    run(cfg)
    return out / "run" / "checkpoints" / "last.ckpt", cfg


def scene_png(colour) -> bytes:
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    image.paste(colour, (8, 8, 40, 40))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.slow  # trains a retrieval model: ~1-2 min of CPU, more on a loaded machine
def test_swapping_the_datastore_changes_retrieved_and_generated_captions(retrieval_ckpt, tmp_path):
    ckpt, cfg = retrieval_ckpt
    captioner = Captioner.from_pretrained(ckpt)
    assert isinstance(captioner.module, RetrievalModule)
    images = [Image.open(io.BytesIO(scene_png(c))) for c in [(220, 40, 40), (40, 40, 220), (40, 200, 40), (200, 200, 40)]]
    own = captioner.describe(images)
    train_captions = set(captioner.module.datastore.captions)
    assert all(len(c.retrieved) == 4 and set(c.retrieved) <= train_captions for c in own)
    # another domain: captions no training scene had
    other = ["an old wooden boat on a quiet lake", "two dogs running across a snowy field",
             "a bowl of soup next to a loaf of bread", "a city street at night with neon signs", "a kite above a beach"]
    Datastore.build(tmp_path / "other", other, [-1] * len(other), captioner.module.encoder)
    swapped = Captioner.from_pretrained(ckpt, datastore=tmp_path / "other")
    theirs = swapped.describe(images)
    assert all(set(c.retrieved) <= set(other) for c in theirs)
    # the smoke model is trained for seconds with a random CLIP, whose nearest captions are noise, so its greedy
    # captions mostly ignore the prompt; sampled with one seed, they show the new prompt reaching the decoder
    sampled = [c.text for c in captioner.describe(images, strategy="sample", seed=0)]
    assert sampled == [c.text for c in captioner.describe(images, strategy="sample", seed=0)]  # the seed repeats
    assert sampled != [c.text for c in swapped.describe(images, strategy="sample", seed=0)]


@pytest.mark.slow
def test_the_web_api_returns_the_retrieved_captions(retrieval_ckpt):
    from fastapi.testclient import TestClient

    from captioner.web.app import Limits, create_app

    ckpt, _ = retrieval_ckpt
    captioner = Captioner.from_pretrained(ckpt)
    with TestClient(create_app(captioner, Limits())) as client:
        response = client.post("/v1/captions", files=[("images", ("a.png", scene_png((220, 40, 40)), "image/png"))])
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert len(result["retrieved"]) == 4 and all(isinstance(c, str) and c for c in result["retrieved"])
    assert result["caption"] == captioner.describe([Image.open(io.BytesIO(scene_png((220, 40, 40))))])[0].text


def test_a_model_without_retrieval_refuses_a_datastore(embedded_ckpt, tmp_path):
    with pytest.raises(ValueError, match="trained without retrieval"):
        Captioner.from_pretrained(embedded_ckpt, datastore=tmp_path)
