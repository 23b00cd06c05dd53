import torch

import unlearn_ext as ue
from row_op_suite import OpSpec, RowOpSuite


class TestTokenLogprob(RowOpSuite):
    spec = OpSpec("token_logprob", teachers=0, labels_required=True)

    def test_memorised_token_keeps_its_gradient(self):
        """p_y within rounding of 1: 1 − p_y must come from expm1, not from 1 − p."""
        logits = torch.zeros(2, 1000)
        logits[:, 3] = 25.0  # p_y = 1 − ~1.4e-8, below float32 resolution of 1 − p
        labels = torch.tensor([3, 3])
        x = logits.clone().requires_grad_(True)
        ue.token_logprob(x, labels, reduction="sum", backend="cpu").backward()
        exact = -torch.expm1(torch.log_softmax(logits.double(), -1)[:, 3])
        torch.testing.assert_close(x.grad[:, 3].double(), exact, rtol=1e-5, atol=0)
        assert (x.grad[:, 3] > 0).all()
