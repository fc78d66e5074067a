"""The logging set-up keeps library deprecation noise out of every rank's output unless debugging."""

import warnings

import pytest

from medscale.logs import setup_logging

DS_WARNING = "`torch.distributed.all_gather_into_tensor` is deprecated. Please use `all_gather_single` instead."


@pytest.mark.parametrize("debug", [False, True])
def test_deepspeed_collective_deprecation_is_hidden_unless_debugging(monkeypatch, debug):
    monkeypatch.setenv("MEDSCALE_DEBUG", "1") if debug else monkeypatch.delenv("MEDSCALE_DEBUG", raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        setup_logging(0)
        warnings.warn(DS_WARNING, FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)  # never hidden
    messages = [str(w.message) for w in seen]
    assert "something else is deprecated" in messages
    assert (DS_WARNING in messages) == debug


def test_metric_fields_read_like_the_training_lines():
    from medscale.logs import metric_fields

    assert metric_fields(auroc=0.6131623290763674, auprc=None, accuracy=0.75, n=60) == \
        "auroc 0.6132  auprc -  accuracy 0.7500  n 60"
