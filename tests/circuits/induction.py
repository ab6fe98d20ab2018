"""The hand-set induction model the circuit tests use (built in :mod:`circuitkd.circuits.mechanisms`):
head 0.0 a previous-token head, head 1.0 an induction head reading 0.0's output in its key; heads 0.1
and 1.1 zero. On :func:`induction_pairs` the mechanism is four edges: embed->0.0<v>, 0.0->1.0<k>,
embed->1.0<v>, 1.0->output."""
from circuitkd.circuits.mechanisms import HAND_HALF as HALF
from circuitkd.circuits.mechanisms import HAND_MECHANISM as MECHANISM
from circuitkd.circuits.mechanisms import hand_induction_model as induction_model
from circuitkd.circuits.mechanisms import induction_pairs

__all__ = ["HALF", "MECHANISM", "induction_model", "induction_pairs"]
