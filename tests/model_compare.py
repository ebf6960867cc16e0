"""Bitwise comparison of compiled MuJoCo models (``FAST_RESET`` against upstream's compile)."""

import numpy as np


def model_arrays(model):
    """Copies of the model's arrays but the textures' pixels (~190 MB of skybox that no reset changes), and of its
    statistics and options (the solver scales its tolerance by ``stat.meaninertia``)."""
    names = [name for name in dir(model) if name != "tex_data" and isinstance(getattr(model, name), np.ndarray)]
    arrays = {name: getattr(model, name).copy() for name in names}
    for struct in ("stat", "opt"):
        for name in dir(getattr(model, struct)):
            value = getattr(getattr(model, struct), name)
            if not name.startswith("_") and isinstance(value, (int, float, np.ndarray)):
                arrays[f"{struct}.{name}"] = np.array(value)
    return arrays


def assert_bitwise(fast, stock):
    """Two ``model_arrays`` bit for bit (signed zeros and NaNs included), as ``assert_array_equal`` does not check."""
    assert sorted(fast) == sorted(stock)
    for key, value in stock.items():
        assert fast[key].dtype == value.dtype and fast[key].shape == value.shape, key
        if fast[key].tobytes() != value.tobytes():
            np.testing.assert_array_equal(fast[key], value, err_msg=key)  # shows where they differ
            raise AssertionError(f"{key}: equal values, different bits (signed zeros?)")
