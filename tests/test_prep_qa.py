import numpy as np

from data_prep.qa import LazyPool, Question, pick_questions
from data_prep.tokens import int32_array


def pools(built):
    def build(fact):
        built.append(fact)
        return Question("count", f"q{fact}", str(fact))

    return {"last": [Question("last", "q", "a")], "count": LazyPool({3, 1, 2, 5, 4}, build),
            "none": [], "time": [Question("time", "t1", "1"), Question("time", "t2", "2")]}


def test_questions_go_round_robin_over_kinds_and_only_the_picked_are_built():
    built = []
    picked = pick_questions(pools(built), 5, "user-7", seed=0)
    assert [q.kind for q in picked] == ["last", "count", "time", "count", "time"]
    assert len({q.question for q in picked}) == 5 and len(built) == 2  # 2 of the 5 count questions built
    assert picked == pick_questions(pools([]), 5, "user-7", seed=0)  # same key and seed: same questions
    assert len(pick_questions(pools([]), 100, "user-7", seed=0)) == 8  # never more than there are


def test_the_key_and_the_seed_both_steer_the_draw():
    def drawn(key, seed):
        return [q.question for q in pick_questions(pools([]), 5, key, seed)]

    # the lone "last" question, then 2 of the 5 count questions and both time questions, in turn
    assert drawn("user-7", 0) == ["q", "q3", "t2", "q1", "t1"]
    assert drawn("user-8", 0) == ["q", "q4", "t2", "q5", "t1"]
    assert drawn("user-7", 1) == ["q", "q1", "t2", "q5", "t1"]


def test_lazy_pools_take_facts_in_sorted_order():
    pool = LazyPool({"b": 2, "a": 1}.items(), lambda fact: Question("k", fact[0], str(fact[1])))
    assert len(pool) == 2 and [q.question for q in pool] == ["a", "b"]


def test_int32_arrays_hold_the_ids():
    ids = [0, 1, 255, 256, 70_000, 2**31 - 1]
    array = int32_array(ids)
    assert array.dtype == np.int32 and array.tolist() == ids and int32_array([]).size == 0
