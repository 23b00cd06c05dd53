import torch

import unlearn_ext as ue
from row_op_suite import OpSpec, RowOpSuite


class TestReverseKL(RowOpSuite):
    spec = OpSpec("reverse_kl", teachers=1, labels_required=False)

    def test_is_forward_kl_with_roles_swapped(self, seed):
        s, t = torch.randn(6, 101), torch.randn(6, 101)
        torch.testing.assert_close(ue.reverse_kl(s, t, reduction="none"), ue.forward_kl(t, s, reduction="none"))

    def test_teacher_masked_where_student_is_not_is_infinite(self):
        s, t = torch.randn(2, 9), torch.randn(2, 9)
        t[1, 2] = float("-inf")
        out = ue.reverse_kl(s, t, reduction="none")
        assert torch.isfinite(out[0]) and torch.isposinf(out[1])
