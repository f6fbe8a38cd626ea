"""Mean and 95% interval over seeds: Student's t, because a study has 3 to 5 seeds, not 30.

numpy has no t quantiles (and scipy is not a dependency), so the two-sided 97.5% points are a table for 1..30
degrees of freedom and the Cornish-Fisher expansion beyond (error < 1e-4 there); tests check the table against a
numerical integration of the t density.
"""
import math

import numpy as np

from arcface.errors import ConfigError

T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
        2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
        2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
Z975 = 1.959963984540054


def t_quantile_975(df):
    """The 97.5% point of Student's t with `df` degrees of freedom."""
    if df < 1 or int(df) != df:
        raise ConfigError(f"a t interval needs an integer df >= 1 (at least 2 values), got {df}")
    df = int(df)
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def mean_ci95(values, bounds=None):
    """{'mean', 'ci95': [lo, hi], 'sd', 'n', 'values'}: mean +- t(0.975, n-1) * sd / sqrt(n) over the values;
    `bounds` (lo, hi) clips the interval to the metric's range (a TAR interval never leaves [0, 1])."""
    values = [float(v) for v in values]
    if len(values) < 2:
        raise ConfigError(f"an interval over seeds needs at least 2 values, got {len(values)}")
    arr = np.asarray(values, dtype=np.float64)
    mean = float(arr.mean())
    sd = float(arr.std(ddof=1))
    half = t_quantile_975(arr.size - 1) * sd / math.sqrt(arr.size)
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return {"mean": mean, "ci95": [lo, hi], "sd": sd, "n": int(arr.size), "values": values}
