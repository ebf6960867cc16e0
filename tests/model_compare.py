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


#: The model arrays that the skybox texture changes (a world never rendered leaves it out): the textures themselves, the
#: material's texture index, the model's sizes (ntex, ntexdata, nnames, npaths), the names buffer and every address in
#: it (``name_*adr``: the skybox is the first, unnamed, texture).
SKYBOX_TEXTURE_ARRAYS = {"tex_adr", "tex_colorspace", "tex_data", "tex_height", "tex_nchannel", "tex_pathadr", "tex_type"}
SKYBOX_TEXTURE_ARRAYS |= {"tex_width", "mat_texid", "names_map", "paths", "names", "_sizes"}


def skybox_arrays(arrays):
    """The names among ``model_arrays`` that the skybox changes (what a world without it may differ in)."""
    return {key for key in arrays if key in SKYBOX_TEXTURE_ARRAYS or (key.startswith("name_") and key.endswith("adr"))}


def assert_bitwise(fast, stock, ignore=frozenset()):
    """Two ``model_arrays`` bit for bit (signed zeros and NaNs included), as ``assert_array_equal`` does not check;
    ``ignore``: array names left out of the comparison."""
    assert sorted(fast) == sorted(stock)
    for key, value in stock.items():
        if key in ignore:
            continue
        assert fast[key].dtype == value.dtype and fast[key].shape == value.shape, key
        if fast[key].tobytes() != value.tobytes():
            np.testing.assert_array_equal(fast[key], value, err_msg=key)  # shows where they differ
            raise AssertionError(f"{key}: equal values, different bits (signed zeros?)")
