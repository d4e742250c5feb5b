"""bench.store_lookup's reinforced store at a tiny size: the store it writes directly as arrays is one the real
TeacherStore opens and ``engine.store verify`` passes, and a lookup of random views and captions returns exactly
the stored rows (the full-size run: ``python -m bench.store_lookup --views 16 --captions 2``)."""
import numpy as np

from bench import store_lookup
from engine.data import augment
from engine.teachers import store as store_lib


def test_reinforced_store_opens_verifies_and_looks_up_the_drawn_views(tmp_path):
    root = tmp_path / "store"
    samples, views, captions, dim = 300, 3, 2, 16
    store_lookup.write_store(root, samples, dim, part_size=128, views=views, captions=captions)
    assert store_lib.verify(str(root)) == []  # everything training checks, then key hashes and unit-norm rows
    store = store_lib.TeacherStore(root)
    assert (store.reinforcement.views, store.reinforcement.captions, store.manifest["count"]) == (views, captions,
                                                                                                 samples)
    assert len(store.parts) == 3  # 128 + 128 + 44 samples
    rows = np.array([0, 5, 130, 299])
    chosen_views, chosen_captions = [2, 0, 1, 2], [1, 0, 1, 0]
    image, text = store.lookup([store_lookup._key(i) for i in rows], rows.tolist(), [None] * len(rows),
                               chosen_views, chosen_captions)
    for b, i in enumerate(rows):
        part = store.parts[i // 128]
        assert np.array_equal(image[b].numpy(), part["image"][i % 128, chosen_views[b]])
        assert np.array_equal(text[b].numpy(), part["text"][i % 128, chosen_captions[b]])
    params = store.view_rows(store_lookup._key(130), 130)  # (K, P): view 0 the evaluation view, the others real
    evaluation = augment.evaluation_view(store_lookup.SOURCE_HW, "shortest", store.reinforcement.aug.num_ops)
    assert params.shape == (views, store.reinforcement.param_width)
    assert augment.View.from_row(params[0]) == evaluation
    assert all(augment.view_problem(augment.View.from_row(row), store_lookup.SOURCE_HW) is None for row in params)
    # opened as training opens it: the row maps of every part (image, text, views) advised as read at random
    assert store.maps_advised == 3 * 3 and store_lib.TeacherStore(root, access="normal").maps_advised == 3 * 3
    assert store.lookup([store_lookup._key(7)], [7], [None], [1], [1])[0].shape == (1, dim)
