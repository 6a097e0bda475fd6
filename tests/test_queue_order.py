"""Fair queue order: users take turns, each user's jobs run oldest first."""

import pytest

from bot.store import JobStore, NewJob

GUILD = 1


@pytest.fixture
async def store(tmp_path):
    store = await JobStore.open(tmp_path / "imagine.sqlite3")
    yield store
    await store.close()


async def enqueue(store: JobStore, user: str) -> int:
    job, _ = await store.enqueue(
        NewJob(GUILD, 10, ord(user), f"{user}", {"seed": 0}), per_user_limit=50, queue_limit=500
    )
    return job.id


async def run_order(store: JobStore) -> str:
    """Dequeue everything and return the users in the order their jobs ran."""
    users = []
    while (job := await store.next_job()) is not None:
        users.append(job.prompt)
        await store.mark_done(job.id, None)
    return "".join(users)


# Each case: the users enqueueing one job each, in arrival order, and the run order.
ORDER_CASES = [
    ("A", "A"),
    ("AAA", "AAA"),
    ("AB", "AB"),
    ("AAAB", "ABAA"),
    ("AAAAAAAAAAB", "ABAAAAAAAAA"),
    ("AAABBC", "ABCABA"),
    ("ABCABC", "ABCABC"),
    ("AABBCC", "ABCABC"),
    ("CBA", "CBA"),
]


@pytest.mark.parametrize(("arrivals", "expected"), ORDER_CASES)
async def test_run_order_table(store, arrivals, expected):
    for user in arrivals:
        await enqueue(store, user)

    assert await run_order(store) == expected


async def test_late_user_not_starved(store):
    for _ in range(10):
        await enqueue(store, "A")
    first = await store.next_job()
    single = await enqueue(store, "B")

    assert first.prompt == "A"
    assert await store.position(single) == 1
    assert (await store.next_job()).id == single


async def test_newcomer_joins_current_round(store):
    # A's jobs of rounds 0 and 1 ran; B arrives while A still has three waiting. B's first
    # job joins round 1, which A has already had, so it runs before A's round-2 job.
    for _ in range(5):
        await enqueue(store, "A")
    for _ in range(2):
        job = await store.next_job()
        await store.mark_done(job.id, None)
    await enqueue(store, "B")
    await enqueue(store, "B")

    assert await run_order(store) == "BABAA"


async def test_positions_match_run_order(store):
    ids = [await enqueue(store, user) for user in "AAABBCA"]
    positions = {job_id: await store.position(job_id) for job_id in ids}

    order = []
    while (job := await store.next_job()) is not None:
        order.append(job.id)
        await store.mark_done(job.id, None)

    assert sorted(positions.values()) == list(range(1, len(ids) + 1))
    assert sorted(ids, key=positions.__getitem__) == order


async def test_position_of_running_and_finished(store):
    first = await enqueue(store, "A")
    second = await enqueue(store, "A")
    await store.next_job()

    assert await store.position(first) == 0
    assert await store.position(second) == 1
    await store.mark_done(first, None)
    assert await store.position(first) is None
    assert await store.position(12345) is None


async def test_positions_stable_among_waiting_jobs(store):
    ids = [await enqueue(store, user) for user in "AABB"]
    before = [await store.position(job_id) for job_id in ids]

    await enqueue(store, "A")
    await enqueue(store, "C")
    after = [await store.position(job_id) for job_id in ids]

    # New jobs may be placed between, but the waiting jobs keep their relative order.
    order_before = sorted(ids, key=dict(zip(ids, before, strict=True)).__getitem__)
    order_after = sorted(ids, key=dict(zip(ids, after, strict=True)).__getitem__)
    assert order_before == order_after


async def test_requeued_job_runs_first(store):
    interrupted = await enqueue(store, "A")
    await enqueue(store, "B")
    await enqueue(store, "C")
    await store.next_job()
    await store.recover()

    assert await store.position(interrupted) == 1
    assert (await store.next_job()).id == interrupted


async def test_queue_listing_in_run_order(store):
    for user in "AAB":
        await enqueue(store, user)
    await store.next_job()

    listing = await store.queue()

    assert [(job.prompt, job.state) for job in listing] == [
        ("A", "running"),
        ("B", "queued"),
        ("A", "queued"),
    ]
