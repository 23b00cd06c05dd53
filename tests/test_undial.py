import pytest
import torch

import unlearn_ext as ue
from row_op_suite import BACKENDS, OpSpec, RowOpSuite


class TestUnDIAL(RowOpSuite):
    spec = OpSpec("undial", teachers=1, labels_required=True, params={"gamma": 10.0})

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_confident_teacher_keeps_precision(self, backend):
        """q_y ≈ 1 before the adjustment: γ must be subtracted on load. Correcting a finished
        sum would cancel catastrophically here."""
        name, device = backend
        t = torch.zeros(3, 2000, device=device)
        t[:, 5] = 40.0
        s = torch.randn(3, 2000, device=device)
        labels = torch.tensor([5, 5, 5], device=device)
        ours = ue.undial(s, t, labels, gamma=3.0, backend=name, reduction="none")
        ref = ue.reference.undial(s.double(), t.double(), labels, gamma=3.0)
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)

    def test_gamma_zero_is_soft_cross_entropy(self, seed):
        s, t = torch.randn(4, 50), torch.randn(4, 50)
        labels = torch.randint(0, 50, (4,))
        soft = -(t.softmax(-1) * s.log_softmax(-1)).sum(-1)
        torch.testing.assert_close(ue.undial(s, t, labels, gamma=0.0, reduction="none"), soft)

    def test_nan_gamma_is_refused(self):
        s = torch.randn(2, 5)
        with pytest.raises(ValueError, match="gamma"):
            ue.undial(s, s, torch.zeros(2, dtype=torch.long), gamma=float("nan"))
