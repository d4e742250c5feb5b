import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from engine.data import shards as data_lib
from engine.data import synthetic
from models.tokenizer import WORDS


def _stream(pattern, batch_size=16, workers=0, seed=0, **options):
    codec = data_lib.Codec(images={"image": lambda im: torch.from_numpy(np.asarray(im)[0, :4].copy())},
                           texts={"text": lambda caps: torch.zeros(len(caps), 2)})
    return data_lib.ShardStream(pattern, codec, batch_size, seed=seed, workers=workers, shuffle_buffer=20, **options)


def test_shards_layout_and_sizes(synth_data):
    root = synth_data["root"]
    sizes = json.loads((root / "sizes.json").read_text())
    assert sizes == {"train-00000.tar": 32, "train-00001.tar": 32, "train-00002.tar": 32, "val-00000.tar": 32}
    assert synth_data["train"].endswith("train-{00000..00002}.tar")
    assert len(data_lib.expand_urls(synth_data["train"])) == 3
    with tarfile.open(root / "train-00001.tar") as tar:
        names = tar.getnames()
        assert names[:4] == ["1000010000.png", "1000010000.txt", "1000010000.json", "1000010000.syn.json"]
        meta = json.loads(tar.extractfile("1000010000.json").read())
        caption = tar.extractfile("1000010000.txt").read().decode()
        synthetic_captions = json.loads(tar.extractfile("1000010000.syn.json").read())["syn_text"]
    assert meta["caption"] == caption and meta["colour"] in caption and meta["shape"] in caption
    assert synthetic.CLASSNAMES[meta["label"]] == f"{meta['colour']} {meta['shape']}"
    assert len(synthetic_captions) == synthetic.SYNTHETIC_CAPTIONS == len(set(synthetic_captions) | {caption}) - 1
    assert all(f"{meta['colour']} {meta['shape']}" in text for text in synthetic_captions)


def test_generation_is_deterministic(tmp_path, synth_data):
    synthetic.write_shard(tmp_path / "again.tar", 1, 1, 32, seed=7)
    assert (tmp_path / "again.tar").read_bytes() == (synth_data["root"] / "train-00001.tar").read_bytes()


def test_all_caption_and_prompt_words_in_tokenizer_vocabulary():
    import numpy as np

    rng = np.random.default_rng(0)
    metas = [synthetic.make_sample(rng)[1] for _ in range(300)]
    words = {w for meta in metas for text in [meta["caption"], *synthetic.synthetic_captions(meta, rng)]
             for w in text.split()}
    words |= {w.strip(".") for t in synthetic.PROMPT_TEMPLATES for c in synthetic.CLASSNAMES
              for w in t.format(c=c).split()}
    assert words <= set(WORDS), words - set(WORDS)


def test_reuse_with_other_spec_refused(synth_data):
    with pytest.raises(ValueError, match="holds a procedural dataset made with"):
        synthetic.build(synth_data["root"], synthetic.SyntheticSpec(train_samples=10), progress=False)


def test_missing_shard_named(synth_data):
    pattern = str(synth_data["root"] / "train-{00000..00004}.tar")
    with pytest.raises(data_lib.ShardError, match=r"missing shard\(s\).*train-00003.tar"):
        data_lib.expand_urls(pattern)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_shard_named(tmp_path, synth_data, damage):
    good = (synth_data["root"] / "train-00000.tar").read_bytes()
    bad = tmp_path / "train-00000.tar"
    bad.write_bytes(good[: len(good) // 2 + 100] if damage == "truncate" else b"not a tar file" * 100)
    (tmp_path / "sizes.json").write_text(json.dumps({"train-00000.tar": 32}))
    with pytest.raises(data_lib.ShardError, match="corrupt shard .*train-00000.tar"):
        list(data_lib.read_shard(str(bad), 32))


def test_epoch_covers_each_sample_once_and_reshuffles(synth_data):
    stream = _stream(synth_data["train"])
    assert stream.steps_per_epoch(0) == 6
    keys0 = [k for b in stream for k in b["key"]]
    stream.set_epoch(1)
    keys1 = [k for b in stream for k in b["key"]]
    assert len(keys0) == len(set(keys0)) == 96 and set(keys0) == set(keys1) and keys0 != keys1


def test_worker_skips_round_robin():
    assert data_lib.worker_skips([3, 1], 3) == [2, 1]
    assert data_lib.worker_skips([3, 1], 4) == [3, 1]
    assert data_lib.worker_skips([2, 2, 2], 4) == [2, 1, 1]


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_skip_equals_tail_of_full_epoch(synth_data, workers):
    stream = _stream(synth_data["train"], workers=workers)
    stream.set_epoch(3)
    full = [b["key"] for b in data_lib.make_loader(stream)]
    stream.set_epoch(3, batches_done=3)
    tail = [b["key"] for b in data_lib.make_loader(stream)]
    assert len(full) == stream.steps_per_epoch(3) and tail == full[3:]


@pytest.mark.parametrize("workers", [0, 2])
def test_resampled_draws_whole_shards_with_replacement_and_resumes(synth_data, workers):
    """open_clip's --dataset-resampled: an epoch is num_samples // batch batches of whole shards drawn with
    replacement (a shard may come twice, another not at all), seeded, and a mid-epoch resume gives the same tail."""
    shard_of = {key: url for url in data_lib.expand_urls(synth_data["train"])
                for key in data_lib.shard_keys(url)}
    stream = _stream(synth_data["train"], workers=workers, resampled=True, num_samples=80)
    repeated = 0
    for epoch in range(4):
        stream.set_epoch(epoch)
        keys = [k for b in data_lib.make_loader(stream) for k in b["key"]]
        assert len(keys) == 80 and stream.steps_per_epoch(epoch) == 5
        repeated += len(keys) - len(set(keys))
        assert {shard_of[k] for k in keys} <= set(shard_of.values())
        stream.set_epoch(epoch)
        assert [k for b in data_lib.make_loader(stream) for k in b["key"]] == keys  # seeded
        stream.set_epoch(epoch, batches_done=2)
        assert [k for b in data_lib.make_loader(stream) for k in b["key"]] == keys[32:]
    assert repeated > 0  # with replacement; without it no key repeats within an epoch
    plain = _stream(synth_data["train"], workers=workers)
    plain.set_epoch(0)
    keys = [k for b in data_lib.make_loader(plain) for k in b["key"]]
    assert len(keys) == len(set(keys)) == 96


def test_batch_larger_than_dataset(synth_data):
    with pytest.raises(ValueError, match="larger than the dataset"):
        _stream(synth_data["train"], batch_size=97)
    with pytest.raises(ValueError, match="no full batch"):
        _stream(synth_data["train"], batch_size=40, workers=3)


def test_round_robin_order():
    assert data_lib.round_robin([4, 2]) == [0, 1, 0, 1, 0, 0]
    assert data_lib.next_worker([4, 2], 3) == 1 and data_lib.next_worker([4, 2], 6) == 0


@pytest.mark.parametrize("model", ["tiny-vit-student", "openai-224"])
def test_codec_batches_equal_the_whole_transform(synth_data, model):
    """The codec's split transform (uint8 per image, float conversion per batch) is bit-identical to open_clip's
    transform applied image by image; openai-224 resizes the 32-pixel images to 224 with CLIP's mean and std."""
    import io

    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    import models

    if model == "openai-224":
        preprocess = image_transform_v2(PreprocessCfg(size=224, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD),
                                        is_train=False)
    else:
        preprocess = models.get_preprocess(models.create_model(model))
    codec = data_lib.Codec({"image": preprocess}, {"text": lambda caps: torch.zeros(len(caps), 2)})
    raws = list(data_lib.read_shard(str(synth_data["root"] / "train-00002.tar")))[:7]
    batch = codec.collate([codec(raw) for raw in raws])
    whole = torch.stack([preprocess(Image.open(io.BytesIO(raw["png"])).convert("RGB")) for raw in raws])
    assert batch["image"].dtype == whole.dtype == torch.float32 and torch.equal(batch["image"], whole)


def test_codec_keeps_other_transforms_whole(synth_data):
    calls = []
    codec = data_lib.Codec({"image": lambda im: calls.append(im.size) or torch.ones(2)}, {})
    raws = list(data_lib.read_shard(str(synth_data["root"] / "train-00002.tar")))[:3]
    batch = codec.collate([codec(raw) for raw in raws])
    assert torch.equal(batch["image"], torch.ones(3, 2)) and calls == [(32, 32)] * 3


def test_prefetcher_same_batches_errors_and_early_stop(synth_data):
    import threading

    stream = _stream(synth_data["train"])
    direct = [b["key"] for b in data_lib.make_loader(_stream(synth_data["train"])).loader]
    loader = data_lib.make_loader(stream)
    assert isinstance(loader, data_lib.Prefetcher)
    assert [b["key"] for b in loader] == direct and len(direct) == 6

    def failing():
        yield 1
        raise data_lib.ShardError("corrupt shard x.tar: damaged")

    with pytest.raises(data_lib.ShardError, match="corrupt shard x.tar"):
        list(data_lib.Prefetcher(failing()))
    before = threading.active_count()
    batches = iter(data_lib.Prefetcher(iter(range(100)), depth=2))
    assert next(batches) == 0 and threading.active_count() == before + 1
    batches.close()  # a consumer that stops early (--stop-after-steps, an error in the step) stops the thread
    assert threading.active_count() == before


@pytest.mark.parametrize("damage", ["truncated", "not a count", "a directory"])
def test_damaged_sizes_file_named(tmp_path, synth_data, damage):
    shutil.copy(synth_data["root"] / "train-00000.tar", tmp_path)
    sizes = tmp_path / "sizes.json"
    if damage == "truncated":
        sizes.write_text(json.dumps({"train-00000.tar": 32}, indent=1)[:20])
    elif damage == "not a count":
        sizes.write_text(json.dumps({"train-00000.tar": "abc"}))
    else:
        sizes.mkdir()
    with pytest.raises(data_lib.ShardError) as exc:
        data_lib.shard_sizes([str(tmp_path / "train-00000.tar")])
    assert str(exc.value).startswith(f"{sizes}: damaged sizes file (") and "\n" not in str(exc.value)


@pytest.mark.parametrize("content", [b"", b"a caption, not a tar\n" * 50], ids=["empty", "text"])
def test_non_tar_shard_is_one_line(tmp_path, content):
    shard = tmp_path / "train-00000.tar"
    shard.write_bytes(content)
    with pytest.raises(data_lib.ShardError) as exc:
        data_lib.shard_keys(str(shard))
    assert str(exc.value) == f"corrupt shard {shard}: not a tar archive"


def test_unreadable_json_member_names_shard_and_sample(tmp_path, synth_data):
    shard = tmp_path / "train-00000.tar"
    with tarfile.open(synth_data["root"] / "train-00000.tar") as tar_in, tarfile.open(shard, "w") as tar_out:
        for member in tar_in.getmembers():
            payload = b"{" if member.name == "1000000003.json" else tar_in.extractfile(member).read()
            member.size = len(payload)
            tar_out.addfile(member, io.BytesIO(payload))
    codec = data_lib.Codec({"image": lambda im: torch.zeros(1)}, {})
    with pytest.raises(data_lib.ShardError, match=rf"^corrupt shard {shard}: sample '1000000003': its \.json member "
                                                  r"cannot be read: Expecting property name"):
        [codec(raw) for raw in data_lib.read_shard(str(shard))]


def test_directory_as_shards_says_so(synth_data):
    root = synth_data["root"]
    with pytest.raises(data_lib.ShardError) as exc:
        data_lib.expand_urls(str(root))
    assert str(exc.value) == (f"{root} is a directory, not a shard: give its shards as a pattern such as "
                              f"{root}/train-{{00000..00015}}.tar")


def test_synthetic_captions_keep_images_and_captions_and_decode_by_index(synth_data):
    """Format 2 adds syn.json from a stream of its own: every image and .txt is format 1's; the codec decodes the
    caption it is asked for (0: the .txt, c: syn_text[c - 1]) and refuses a sample without enough captions."""
    import hashlib

    import models

    raws = list(data_lib.read_shard(str(synth_data["root"] / "train-00001.tar")))
    digest = hashlib.sha256(b"".join(raw["png"] + raw["txt"] for raw in raws)).hexdigest()
    assert digest == "c1fba9b2d6604c985a266694ada1909e95e20eb31c051db2697dfe99cd8bfceb"  # format 1's shard, seed 7

    class FirstView:
        def choose(self, key, epoch):
            return 0, epoch

        def replay(self, image, raw, view, digest):
            return image

    codec = data_lib.Codec({"image": models.get_preprocess(models.create_model("tiny-vit-student"))}, {},
                           views=FirstView())
    for epoch in range(1 + synthetic.SYNTHETIC_CAPTIONS):
        sample = codec(raws[3], epoch)
        assert sample["caption"] == data_lib.sample_captions(raws[3], 5)[epoch] and sample["caption_index"] == epoch
    assert sample["caption"] == json.loads(raws[3]["syn.json"])["syn_text"][3] and sample["view_index"] == 0
    assert data_lib.sample_captions(raws[3]) == [raws[3]["txt"].decode()]
    with pytest.raises(data_lib.ShardError) as exc:
        data_lib.sample_captions(raws[3], 6)
    assert str(exc.value) == (f"corrupt shard {raws[3]['__url__']}: sample {raws[3]['__key__']!r} has 5 caption(s) "
                              f"(.txt and syn.json's syn_text), 6 are needed")
