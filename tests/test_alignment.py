"""5-point alignment: Umeyama recovers a known similarity, warped landmarks land on the template."""
import numpy as np
import pytest
from PIL import Image

from arcface.errors import DataError
from arcface.eval.alignment import (ARCFACE_TEMPLATE_112, align_face, arcface_template, landmarks_68_to_5,
                                    similarity_to_template, umeyama, warp_affine)


def similarity(scale, angle, tx, ty):
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty], [0.0, 0.0, 1.0]])


def apply(matrix, points):
    return points @ matrix[:2, :2].T + matrix[:2, 2]


def test_template_matches_insightface_and_scales():
    upstream_96 = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366],
                            [33.5493, 92.3655], [62.7299, 92.2041]])
    upstream_96[:, 0] += 8.0  # eval_ijbc.py's 96x112 template shifted to 112x112
    np.testing.assert_allclose(ARCFACE_TEMPLATE_112, upstream_96, atol=1e-6)
    np.testing.assert_allclose(arcface_template(224), ARCFACE_TEMPLATE_112 * 2)
    np.testing.assert_allclose(arcface_template(112), ARCFACE_TEMPLATE_112)


@pytest.mark.parametrize("scale,angle,tx,ty", [(0.45, 0.3, -20.0, 7.5), (2.0, -1.1, 31.0, -4.0), (1.0, 0.0, 0.0, 0.0)])
def test_known_similarity_is_recovered_exactly(scale, angle, tx, ty):
    truth = similarity(scale, angle, tx, ty)  # image -> crop
    landmarks = apply(np.linalg.inv(truth), ARCFACE_TEMPLATE_112)  # where the face is in the image
    estimated = similarity_to_template(landmarks, 112)
    np.testing.assert_allclose(estimated, truth[:2], atol=1e-9)


def test_umeyama_is_the_least_squares_similarity():
    rng = np.random.default_rng(3)
    src = rng.uniform(0, 200, (5, 2))
    dst = apply(similarity(0.6, 0.4, 10, 20), src) + rng.normal(0, 2.0, (5, 2))
    best = umeyama(src, dst)

    def residual(params):
        return np.sum((apply(similarity(*params), src) - dst) ** 2)

    scale = np.hypot(best[0, 0], best[1, 0])
    params = np.array([scale, np.arctan2(best[1, 0], best[0, 0]), best[0, 2], best[1, 2]])
    base = residual(params)
    for k in range(4):  # any small move of scale, angle or translation makes the fit worse
        for step in (1e-4, -1e-4):
            moved = params.copy()
            moved[k] += step
            assert residual(moved) > base
    assert np.linalg.det(best[:2, :2]) > 0  # a similarity, never a reflection


def blob_image(points, size=(220, 180), sigma=1.6):
    """Black RGB image with a bright Gaussian dot centred on each (x, y) pixel-index coordinate."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w), dtype=np.float64)
    for x, y in points:
        img = np.maximum(img, np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2)))
    return np.repeat((img * 255).round().astype(np.uint8)[:, :, None], 3, axis=2)


def centroids(gray, points, radius=6):
    out = []
    yy, xx = np.mgrid[0:gray.shape[0], 0:gray.shape[1]]
    for x, y in points:
        mask = (np.abs(xx - x) <= radius) & (np.abs(yy - y) <= radius)
        weight = gray * mask
        out.append([np.sum(weight * xx) / weight.sum(), np.sum(weight * yy) / weight.sum()])
    return np.array(out)


@pytest.mark.parametrize("output_size", [112, 224])
def test_warped_landmarks_land_on_the_template(output_size):
    truth = similarity(0.9, 0.35, -30.0, -40.0)
    landmarks = apply(np.linalg.inv(truth), ARCFACE_TEMPLATE_112)
    image = blob_image(landmarks, sigma=1.6 / 0.9 * output_size / 112)
    crop = align_face(Image.fromarray(image), landmarks, output_size)
    assert crop.shape == (output_size, output_size, 3) and crop.dtype == np.uint8
    template = arcface_template(output_size)
    found = centroids(crop[:, :, 0].astype(np.float64), template, radius=output_size // 18)
    np.testing.assert_allclose(found, template, atol=0.15)


def test_warp_matches_index_coordinate_bilinear_sampling():
    """Our PIL call equals sampling the source at inverse(M) @ (x, y) in pixel-index coordinates (cv2's rule)."""
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (90, 120, 3)).astype(np.uint8)
    matrix = similarity(1.3, 0.2, -15.0, -5.0)
    out = warp_affine(src, matrix[:2], 64)
    inv = np.linalg.inv(matrix)
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float64)
    sx = inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]
    sy = inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]
    inside = (sx >= 1) & (sy >= 1) & (sx <= src.shape[1] - 2) & (sy <= src.shape[0] - 2)
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    x0c, y0c = np.clip(x0, 0, src.shape[1] - 2), np.clip(y0, 0, src.shape[0] - 2)
    s = src.astype(np.float64)
    expected = ((1 - fx) * (1 - fy) * s[y0c, x0c] + fx * (1 - fy) * s[y0c, x0c + 1]
                + (1 - fx) * fy * s[y0c + 1, x0c] + fx * fy * s[y0c + 1, x0c + 1])
    assert inside.sum() > 1000
    diff = np.abs(out.astype(np.float64) - expected)[inside]
    assert diff.max() <= 1.0
    far_outside = (sx < -2) | (sy < -2) | (sx > src.shape[1] + 1) | (sy > src.shape[0] + 1)
    assert far_outside.any() and (out[far_outside] == 0).all()  # black border


def test_68_point_landmarks_are_reduced_like_upstream():
    rng = np.random.default_rng(1)
    pts = rng.uniform(0, 100, (68, 2))
    five = landmarks_68_to_5(pts)
    np.testing.assert_allclose(five[0], (pts[36] + pts[39]) / 2)
    np.testing.assert_allclose(five[1], (pts[42] + pts[45]) / 2)
    np.testing.assert_allclose(five[2:], pts[[30, 48, 54]])
    np.testing.assert_allclose(similarity_to_template(pts), similarity_to_template(five))


def test_bad_landmarks_are_data_errors():
    with pytest.raises(DataError, match=r"\[5, 2\]"):
        similarity_to_template(np.zeros((4, 2)))
    with pytest.raises(DataError, match="degenerate"):
        similarity_to_template(np.ones((5, 2)))
    with pytest.raises(DataError, match="NaN"):
        similarity_to_template(np.full((5, 2), np.nan))
