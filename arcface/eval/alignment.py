"""5-point face alignment to the ArcFace template, without cv2 / skimage.

Upstream estimates a similarity (skimage SimilarityTransform = Umeyama least squares) from the five
landmarks (left eye, right eye, nose, left / right mouth corner) to the template, then warps with
cv2.warpAffine (bilinear, black border). Here the estimate is Umeyama in numpy and the warp is PIL's
Image.transform(AFFINE) fed the inverse matrix, corrected for PIL's pixel-centre convention so a
landmark at pixel index (x, y) lands where cv2 would put it. The only intended difference from cv2 is the
half-pixel band at the image border (PIL clamps, cv2 blends with black) and the bilinear rounding (<= 1 level).
"""
import numpy as np
from PIL import Image

from ..errors import DataError

ARCFACE_TEMPLATE_112 = np.array([
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
], dtype=np.float64)


def arcface_template(output_size=112):
    """The 5-point template for a square crop of `output_size` (the 112 template scaled by size / 112)."""
    return ARCFACE_TEMPLATE_112 * (float(output_size) / 112.0)


def landmarks_68_to_5(points):
    """Eye centres, nose tip and mouth corners from 68-point landmarks (the conversion upstream applies)."""
    points = np.asarray(points, dtype=np.float64)
    return np.stack([
        (points[36] + points[39]) / 2,
        (points[42] + points[45]) / 2,
        points[30],
        points[48],
        points[54],
    ])


def umeyama(src, dst, estimate_scale=True):
    """3x3 homogeneous similarity T minimising sum |T(src_i) - dst_i|^2 (Umeyama 1991, with reflection guard)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    n, dim = src.shape
    src_mean = src.mean(axis=0)
    dst_mean = dst.mean(axis=0)
    src_c = src - src_mean
    dst_c = dst - dst_mean
    cov = dst_c.T @ src_c / n
    signs = np.ones(dim)
    if np.linalg.det(cov) < 0:
        signs[-1] = -1
    u, s, vt = np.linalg.svd(cov)
    rank = np.linalg.matrix_rank(cov)
    transform = np.eye(dim + 1)
    if rank == 0:
        raise DataError("landmarks are degenerate (all points coincide); cannot estimate a similarity")
    if rank == dim - 1:
        if np.linalg.det(u) * np.linalg.det(vt) > 0:
            rotation = u @ vt
        else:
            last = signs[-1]
            signs[-1] = -1
            rotation = u @ np.diag(signs) @ vt
            signs[-1] = last
    else:
        rotation = u @ np.diag(signs) @ vt
    scale = (s @ signs) / src_c.var(axis=0).sum() if estimate_scale else 1.0
    transform[:dim, :dim] = scale * rotation
    transform[:dim, dim] = dst_mean - scale * rotation @ src_mean
    return transform


def similarity_to_template(landmarks, output_size=112):
    """2x3 matrix mapping image pixel coordinates to crop coordinates (what cv2.warpAffine would take)."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape == (68, 2):
        landmarks = landmarks_68_to_5(landmarks)
    if landmarks.shape != (5, 2):
        raise DataError(f"expected 5 landmarks as [5, 2] (x, y), got shape {list(landmarks.shape)}")
    if not np.all(np.isfinite(landmarks)):
        raise DataError(f"landmarks contain NaN or infinity: {landmarks.tolist()}")
    return umeyama(landmarks, arcface_template(output_size))[:2]


def warp_affine(image, matrix, output_size):
    """Warp `image` (PIL image or HxWx3 uint8) by the 2x3 forward `matrix` into an RGB uint8 [S, S, 3] array."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(image))
    if image.mode != "RGB":
        image = image.convert("RGB")
    forward = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    a, b, c, d, e, f = np.linalg.inv(forward)[:2].ravel()
    # PIL samples output pixel (x, y) at input a*(x+.5)+b*(y+.5)+c in edge coordinates (pixel i spans [i, i+1]);
    # cv2 / landmark files use index coordinates (pixel i centred on i). Shift so both agree.
    coeffs = (a, b, c + 0.5 - 0.5 * a - 0.5 * b, d, e, f + 0.5 - 0.5 * d - 0.5 * e)
    warped = image.transform((int(output_size), int(output_size)), Image.AFFINE, coeffs,
                             resample=Image.BILINEAR, fillcolor=(0, 0, 0))
    return np.asarray(warped, dtype=np.uint8)


def align_face(image, landmarks, output_size=112):
    """Aligned RGB crop [S, S, 3] uint8 of the face whose 5 landmarks (pixel x, y) are given."""
    return warp_affine(image, similarity_to_template(landmarks, output_size), output_size)
