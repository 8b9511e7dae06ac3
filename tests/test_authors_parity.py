"""The port against the authors' own code: weights and every tensor of their run.

`tests/fixtures/authors-dtop/` holds a 12-layer ViT-96 with three grading
heads and its intermediate tensors, pruned (p0 = 0.7) and dense (p0 = 1.0).
"""

import numpy as np
import pytest
from conftest import load_fixture, to_numpy

from keras_dtop.convert import load_authors_state_dict, segmenter_from_authors_state_dict

TOL = 1e-4
CASES = [("reference_p0.7.npz", 0.7), ("reference_dense.npz", 1.0)]


def state_dict(ref):
    return {k[2:]: ref[k] for k in ref.files if k.startswith("w/")}


def build(ref, p0):
    return segmenter_from_authors_state_dict(
        state_dict(ref), num_heads=3, head_num_heads=3, prune_threshold=p0, keep_top_k=5
    )


def nhwc(ref):
    return np.transpose(ref["input/normalized"], (0, 2, 3, 1))


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def case(request):
    name, p0 = request.param
    ref = load_fixture(name)
    model = build(ref, p0)
    details = to_numpy(model(nhwc(ref), training=False, return_details=True))
    return ref, model, details


def test_exit_masks_are_exact(case):
    ref, _, details = case
    for j, head in enumerate(details["heads"]):
        np.testing.assert_array_equal(head["alive"], ~ref[f"head{j}/exited_in"], f"head {j}")
    exited = ~details["heads"][-1]["alive"]
    np.testing.assert_array_equal(exited, ref["head2/exited_out"])
    counts = [[len(ref[f"head{j}/alive_idx_b{b}"]) for j in range(3)] for b in range(2)]
    np.testing.assert_array_equal(details["alive_counts"], counts)


def test_head_outputs_canvas_and_scores(case):
    ref, _, details = case
    for j, head in enumerate(details["heads"]):
        seen = ~ref[f"head{j}/exited_in"][:, None, :]
        np.testing.assert_allclose(
            head["presence_logits"], ref[f"head{j}/class_logits"], atol=TOL, err_msg=f"head {j}"
        )
        np.testing.assert_allclose(
            np.where(seen, head["mask_logits"], 0.0),
            np.where(seen, ref[f"head{j}/dec2_attn_logits"], 0.0),
            atol=TOL,
        )
        np.testing.assert_allclose(head["canvas"], ref[f"head{j}/mask_logits"], atol=TOL)
        np.testing.assert_allclose(head["token_scores"], ref[f"head{j}/score"], atol=TOL)


def test_final_scores_and_labels(case):
    ref, _, details = case
    scores = np.transpose(details["scores"], (0, 3, 1, 2))
    np.testing.assert_allclose(scores, ref["final/seg_logits"], atol=TOL)
    np.testing.assert_allclose(details["token_scores"], ref["final/token_score"], atol=TOL)
    np.testing.assert_array_equal(np.argmax(details["scores"], -1), ref["final/pred_sem_seg"])


def test_exit_stage_map(case):
    ref, _, details = case
    expected = np.full((2, 64), 2)
    expected[ref["head1/pruned_here"]] = 1
    expected[ref["head0/pruned_here"]] = 0
    np.testing.assert_array_equal(details["exit_stage"].reshape(2, 64), expected)


def test_backbone_layers_one_by_one(case):
    """Each block, fed the authors' input tokens and exit mask, gives their output."""
    ref, model, _ = case
    embedded = to_numpy(model.backbone.patch_embedding(nhwc(ref)))
    np.testing.assert_allclose(embedded, ref["backbone/tokens_in"], atol=TOL)
    x = ref["backbone/tokens_in"]
    for i, block in enumerate(model.backbone.encoder_blocks):
        keep = ~ref[f"backbone/layer{i:02d}_exited_in"]
        out = to_numpy(block(x, keep_mask=keep))
        np.testing.assert_allclose(out, ref[f"backbone/layer{i:02d}_out"], atol=TOL, err_msg=f"{i}")
        x = ref[f"backbone/layer{i:02d}_out"]


def test_head_internals(case):
    """Memory, every decoder layer's queries and logits of each head, from their inputs."""
    ref, model, _ = case
    for j, head in enumerate(model.grading_heads):
        keep = ~ref[f"head{j}/exited_in"]
        _, _, inner = head(ref[f"head{j}/features_in"], keep_mask=keep, return_intermediates=True)
        inner = to_numpy(inner)
        memory = np.where(keep[..., None], inner["memory"], 0.0)
        np.testing.assert_allclose(memory, ref[f"head{j}/memory"], atol=TOL)
        for layer in range(3):
            np.testing.assert_allclose(
                inner["queries"][layer], ref[f"head{j}/dec{layer}_queries"], atol=TOL
            )
            logits = np.where(keep[:, None, :], inner["attention_logits"][layer], 0.0)
            np.testing.assert_allclose(logits, ref[f"head{j}/dec{layer}_attn_logits"], atol=TOL)


def test_preprocessor_matches_authors_normalisation():
    from keras_dtop import DToPImageConverter

    ref = load_fixture("reference_dense.npz")
    rgb = ref["input/image_bgr_uint8"][..., ::-1].astype("float32")
    converted = to_numpy(DToPImageConverter.from_mean_std()(rgb))
    np.testing.assert_allclose(converted, nhwc(ref), atol=1e-5)


@pytest.mark.parametrize("name, p0", CASES, ids=[c[0] for c in CASES])
def test_predict_on_raw_pixels_matches_the_authors(name, p0):
    # The converted model normalises raw RGB pixels as the authors' inference does.
    ref = load_fixture(name)
    model = build(ref, p0)
    rgb = ref["input/image_bgr_uint8"][..., ::-1]
    expected = np.transpose(ref["final/seg_logits"], (0, 2, 3, 1))
    np.testing.assert_allclose(model.predict(rgb, verbose=0), expected, atol=TOL)
    bare = segmenter_from_authors_state_dict(
        state_dict(ref), num_heads=3, head_num_heads=3, prune_threshold=p0, preprocessor=None
    )
    assert bare.preprocessor is None


def test_converter_reports_every_mismatch():
    ref = load_fixture("reference_dense.npz")
    model = build(ref, 1.0)
    sd = state_dict(ref)
    before = to_numpy(model.backbone.patch_embedding.projection.kernel)
    del sd["decode_head.class_embed.bias"]
    sd["decode_head.extra.weight"] = np.zeros(3)
    sd["backbone.layers.3.ln1.weight"] = np.zeros(95, "float32")
    sd["backbone.patch_embed.projection.weight"] = sd["backbone.patch_embed.projection.weight"] * 2
    with pytest.raises(ValueError) as error:
        load_authors_state_dict(model, sd)
    message = str(error.value)
    assert "missing keys: decode_head.class_embed.bias" in message
    assert "unexpected keys: decode_head.extra.weight" in message
    assert "backbone.layers.3.ln1.weight: checkpoint (95,)" in message
    # Nothing was written.
    np.testing.assert_array_equal(
        to_numpy(model.backbone.patch_embedding.projection.kernel), before
    )


def test_converter_rejects_wrong_head_count():
    ref = load_fixture("reference_dense.npz")
    with pytest.raises(ValueError, match="unexpected keys: auxiliary_head.1"):
        segmenter_from_authors_state_dict(
            state_dict(ref), num_heads=3, head_num_heads=3, stage_ends=(5, 11)
        )
