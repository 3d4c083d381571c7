"""The torchmetrics base of every metric here: one scalar from compute(), the rest on request."""

from __future__ import annotations

from typing import Dict

from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import apply_to_collection


class DetailedMetric(Metric):
    """A ``Metric`` whose ``compute()`` is its main value, a 0-dim tensor.

    So ``self.log(name, metric)`` and ``MetricCollection`` take it as they take any
    torchmetrics scalar. ``compute_details()`` returns every value (the main one under
    ``main_key``), synced across processes as ``compute()`` is.
    """

    main_key: str

    def _details(self) -> Dict[str, Tensor]:
        """Every value, from the (already synced) states."""
        raise NotImplementedError

    def compute(self) -> Tensor:
        return self._details()[self.main_key]

    def compute_details(self) -> Dict[str, Tensor]:
        """Every value this metric reports, as a dict of tensors (see the class docstring)."""
        # Leave a sync the caller made in place; otherwise sync as compute() does, and undo it.
        synced_already = self._is_synced
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn,
            should_sync=self._to_sync and not synced_already,
            should_unsync=self._should_unsync and not synced_already,
        ):
            # Copies: the states keep accumulating in place after this returns.
            return apply_to_collection(self._details(), Tensor, lambda x: x.clone())
