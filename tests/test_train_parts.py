"""Training pieces: index, sampler, multi-view batches, optimizer groups, schedule."""
import numpy as np
import paddle
import pytest

from ernievil2.cli import load_train_config as load_config
from ernievil2.data.tsv import DataError
from ernievil2.factory import build_dual_encoder as create_model
from ernievil2.tokenizer import ErnieTokenizer
from ernievil2.train.data import EpochSampler, MultiViewBatcher, TrainIndex
from ernievil2.train.optim import build_optimizer, lr_at, param_groups
from ernievil2.transforms import make_eval_transform, make_train_transform
from helpers import TINY_ERNIE, TINY_VIT, make_image, tsv_line, write_vocab


def write_train_tsv(path, n_images=6, captions=2, tags=True, bom=False):
    lines = []
    for i in range(n_images):
        for c in range(captions):
            row = tsv_line(["红色的圆形", "a red circle", "蓝色方块"][c % 3], f"img{i}", make_image(i))
            lines.append(row + ("\tred circle" if tags else ""))
    text = ("\ufeff" if bom else "") + "\n".join(lines) + "\n\n"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_index_counts_lines_ids_and_handles_bom_and_trailing_blank(tmp_path):
    idx = TrainIndex(write_train_tsv(tmp_path / "t.tsv", bom=True), need_tags=True)
    assert len(idx) == 12
    assert idx.line_numbers.tolist() == list(range(1, 13))
    assert idx.image_index.tolist() == [i // 2 for i in range(12)]
    with open(idx.path, "rb") as f:
        line_no, fields = idx.read(f, 5)
    assert line_no == 6 and fields[1] == "img2" and fields[3] == "red circle"


def test_index_errors_name_file_and_line(tmp_path):
    p = tmp_path / "t.tsv"
    write_train_tsv(p, tags=False)
    with pytest.raises(DataError, match=r"t\.tsv:1: the tags view needs object tags"):
        TrainIndex(str(p), need_tags=True)
    lines = p.read_text(encoding="utf-8").splitlines()
    lines[2] = "only\ttwo"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"t\.tsv:3: expected 3 to 5"):
        TrainIndex(str(p))


def test_sampler_is_a_seeded_permutation_per_epoch():
    s = EpochSampler(10, 4, seed=1)
    assert s.steps_per_epoch == 2
    e0 = np.concatenate([s.rows(0)[1], s.rows(1)[1]])
    assert len(set(e0.tolist())) == 8
    assert s.rows(2)[0] == 1 and not np.array_equal(s.rows(2)[1], s.rows(0)[1])
    np.testing.assert_array_equal(EpochSampler(10, 4, seed=1).rows(3)[1], s.rows(3)[1])
    with pytest.raises(ValueError, match="exceeds"):
        EpochSampler(3, 4, 0)


def make_batcher(tmp_path, views, rank=0, world=1, **kw):
    idx = TrainIndex(write_train_tsv(tmp_path / "t.tsv"), need_tags="tags" in views)
    tok = ErnieTokenizer.from_file(write_vocab(tmp_path / "v.txt"), max_seq_len=16)
    return MultiViewBatcher(idx, views, tok, make_train_transform(32), make_eval_transform(32),
                            seed=3, rank=rank, world_size=world, num_workers=kw.pop("num_workers", 0), **kw)


def test_batches_have_every_view_and_do_not_depend_on_process_count(tmp_path):
    views = ["image", "image_aug", "text", "text_aug", "tags"]
    rows = np.array([0, 3, 5, 7])
    whole = make_batcher(tmp_path, views).batch(0, rows)
    assert whole["image"].shape == (4, 3, 32, 32) and whole["text"].shape[0] == 4
    assert not np.array_equal(whole["image"], whole["image_aug"])  # two augmentations
    assert whole["ids"].tolist() == [0, 1, 2, 3]
    halves = [make_batcher(tmp_path, views, rank=r, world=2, num_workers=2).batch(0, rows)
              for r in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), whole["image"])
    np.testing.assert_array_equal(np.concatenate([h["image_aug"] for h in halves]), whole["image_aug"])


def test_masked_text_view_masks_or_drops_tokens_only(tmp_path):
    b = make_batcher(tmp_path, ["text", "text_aug"], text_mask_prob=0.9)
    out = b.batch(0, np.arange(12))
    tok = b.tok
    assert (out["text_aug"][:, 0] == tok.cls_id).all()
    assert (out["text_aug"] == tok.mask_id).any()
    assert ((out["text_aug"] != tok.pad_id).sum(1) < (out["text"] != tok.pad_id).sum(1)).any()


def test_other_caption_view_takes_a_caption_of_the_same_image(tmp_path):
    b = make_batcher(tmp_path, ["text", "text_aug"], text_aug="other_caption")
    out = b.batch(0, np.array([0, 1]))
    # rows 0 and 1 are the two captions of img0: each one's other caption is the other one
    np.testing.assert_array_equal(out["text_aug"][0][: (out["text"][1] > 0).sum()],
                                  out["text"][1][: (out["text"][1] > 0).sum()])


def test_no_weight_decay_on_norms_biases_embeddings_temperatures():
    cfg = load_config(None, ["lr=0.001", "image_lr=0.0001"])
    paddle.seed(0)
    model = create_model(dict(TINY_VIT), dict(TINY_ERNIE))
    model.add_temperatures([("image", "text"), ("text", "text_aug")])
    groups, decay = param_groups(model, cfg)
    names = {p.name: n for n, p in model.named_parameters()}
    decayed = {names[n] for n in decay if n in names}
    assert "text_model.encoder_stack.block.0.attn.q.weight" in decayed
    assert "visual.blocks.0.mlp.fc1.weight" in decayed
    for n in ("text_model.word_emb.weight", "text_model.pos_emb.weight", "visual.class_embedding",
              "visual.positional_embedding", "text_model.ln.weight", "visual.blocks.0.attn.qkv.bias",
              "contrastive_loss_mm.temperature_b", "train_heads.temperature_text__text_aug"):
        assert n not in decayed, n
    mults = sorted(g["learning_rate"] for g in groups)
    assert mults == pytest.approx([0.1, 1.0])
    opt, _ = build_optimizer(model, cfg)
    assert opt is not None


def test_frozen_tower_is_left_out_of_the_optimizer():
    from ernievil2.train.optim import freeze
    cfg = load_config(None)
    model = create_model(dict(TINY_VIT), dict(TINY_ERNIE))
    freeze(model.visual)
    groups, _ = param_groups(model, cfg)
    ids = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in ids for p in model.visual.parameters())


def test_warmup_then_cosine():
    cfg = load_config(None, ["lr=1.0", "warmup_steps=10", "max_steps=110", "min_lr_ratio=0.1"])
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 110))




def test_validation_reports_both_protocols_in_percent(tmp_path):
    from ernievil2.train.validate import validate
    paddle.seed(0)
    model = create_model(dict(TINY_VIT), dict(TINY_ERNIE))
    model.train()
    tok = ErnieTokenizer.from_file(write_vocab(tmp_path / "v.txt"), max_seq_len=16)
    res = validate(model, write_train_tsv(tmp_path / "val.tsv"), make_eval_transform(32),
                   lambda t: tok.batch_encode(t, padding="longest"), batch_size=5, num_workers=0)
    assert model.training  # restored
    assert set(res) == {"official", "multi_caption", "official_pessimistic",
                        "multi_caption_pessimistic"}
    for rows in res.values():
        assert set(rows) == {"Text2Image", "Image2Text", "MeanRecall"}
        assert all(0 <= v <= 100 for row in rows.values() for v in row.values())
    for protocol in ("official", "multi_caption"):  # ties count against the query: never higher
        for name, row in res[protocol + "_pessimistic"].items():
            assert all(row[k] <= res[protocol][name][k] for k in row)
    # 6 images x 2 captions: multi-caption I2T R@10 covers all 6 images
    assert res["multi_caption"]["Image2Text"]["R@10"] == 100.0
