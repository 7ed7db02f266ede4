"""``estimatesmartfee``: a small estimator fed by what this node saw confirmed.

Bitcoin Core's estimator (policy/fees.cpp) tracks how long transactions it
had in its mempool took to confirm, per fee rate bucket, and answers
``{"errors": ["Insufficient data or no feerate found"], "blocks": 0}`` until
it has enough of them. This one keeps the same contract with a far simpler
model:

- a sample is the fee rate of a transaction that was in this node's mempool
  when a block confirmed it (blocks mined from outside transactions, such as
  the premine or ``generateblock`` with raw hex, add none);
- only samples from the last ``WINDOW`` connected blocks count; a reorg drops
  the samples of the blocks it disconnects;
- with fewer than ``MIN_SAMPLES`` of them there is no estimate (three keeps a
  single odd transaction from setting the rate, and is few enough that a
  regtest session gets an answer after its first payments confirm);
- the answer is the ``PERCENTILE`` fee rate of the samples (nearest rank, so
  most recently confirmed transactions paid at most that), never below the
  minimum relay fee: paying it confirmed nine in ten of them.

Nothing is persisted: like Core after deleting ``fee_estimates.dat``, a
restarted node has no estimate until it sees new confirmations.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from gateway.chain.node.common import MIN_RELAY_FEE_PER_KVB

WINDOW = 144
MIN_SAMPLES = 3
PERCENTILE = 0.90


class FeeEstimator:
    """Fee rates (sat/kvB) of mempool transactions confirmed in the last ``WINDOW`` blocks."""

    def __init__(self) -> None:
        self._blocks: OrderedDict[bytes, list[int]] = OrderedDict()

    def record(self, block_hash: bytes, rates: list[int]) -> None:
        """A block was connected; ``rates`` are those of the mempool transactions it confirmed."""
        self._blocks[block_hash] = rates
        while len(self._blocks) > WINDOW:
            self._blocks.popitem(last=False)

    def forget(self, block_hash: bytes) -> None:
        """A block was disconnected by a reorg: its samples no longer count."""
        self._blocks.pop(block_hash, None)

    @property
    def samples(self) -> int:
        """How many fee rates are in the window."""
        return sum(len(rates) for rates in self._blocks.values())

    def estimate(self) -> int | None:
        """The estimate in sat/kvB, or None without enough data."""
        rates = sorted(rate for block in self._blocks.values() for rate in block)
        if len(rates) < MIN_SAMPLES:
            return None
        rank = max(1, math.ceil(PERCENTILE * len(rates)))
        return max(MIN_RELAY_FEE_PER_KVB, rates[rank - 1])
