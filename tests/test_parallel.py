"""kdkit.parallel: jobs wait for what they need, and a failing job names itself."""

from __future__ import annotations

import pytest

from kdkit.errors import KdkitError
from kdkit.parallel import Job, choose_jobs, run_jobs


def test_a_job_may_wait_only_for_an_earlier_job() -> None:
    with pytest.raises(KdkitError, match="job 'kd' waits for 'teacher', which is not an earlier job"):
        run_jobs([Job("kd", "fashion_mnist/kd", after=("teacher",)), Job("teacher", "fashion_mnist/teacher")], 2)
    with pytest.raises(KdkitError, match=r"job keys repeat: \['a'\]"):
        run_jobs([Job("a", "fashion_mnist/kd"), Job("a", "fashion_mnist/kd")], 1)


def test_the_number_of_jobs_follows_the_device_unless_asked() -> None:
    assert choose_jobs(3, "cpu") == 3 and choose_jobs(None, "cuda") == 1
    assert choose_jobs(None, "cpu") in (1, 2)
    with pytest.raises(KdkitError, match="--jobs must be at least 1"):
        choose_jobs(0, "cpu")


@pytest.mark.slow
def test_a_job_that_fails_in_a_worker_names_itself_and_its_error() -> None:
    # the error crosses the process boundary as its rendered message (KdkitError does not survive pickling)
    with pytest.raises(KdkitError) as caught:
        run_jobs([Job("broken", "fashion_mnist/no_such_recipe")], 2)
    message = caught.value.render()
    assert message.startswith("run 'broken' failed: no recipe file 'fashion_mnist/no_such_recipe'")
    assert message.count("fix:") == 1 and "valid choices: fashion_mnist/" in message
