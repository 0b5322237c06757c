"""serve.Slots: the per-ip count and the idle count workers read without a lock."""

from qspp.serve import Slots


def key(last: int) -> bytes:
    return Slots.key(bytes(15) + bytes([last]))


def test_take_counts_only_whole_slots():
    slots = Slots(4)
    a = Slots.key(b"\1" + bytes(14) + b"\1")
    b = Slots.key(bytes(14) + b"\1\7")
    assert slots.take(0, a) == 1
    assert slots.take(1, b) == 1
    # A's last byte and B's first sixteen spell A: not a slot of A
    assert slots.mem[:34].find(a, 1) == 16
    assert slots.take(0, a) == 1
    assert slots.take(2, a) == 2
    assert slots.take(3, key(2)) == 1
    assert slots.take(3, a) == 3
    slots.free(2)
    assert slots.take(0, a) == 2
    assert slots.busy() == 3


def test_idle_is_the_parents_count_less_the_busy():
    slots = Slots(40)
    slots.set_workers(16)
    assert slots.busy() == 0 and slots.idle() == 16
    for i in range(9):
        slots.take(i, key(i))
    assert slots.idle() == 7
    slots.take(20, Slots.BALANCER)
    assert slots.busy() == 10 and slots.idle() == 6
    slots.free(20)
    slots.set_workers(17)
    assert slots.idle() == 8
