import torch

import unlearn_ext as ue
from row_op_suite import OpSpec, RowOpSuite


class TestForwardKL(RowOpSuite):
    spec = OpSpec("forward_kl", teachers=1, labels_required=False)

    def test_matches_torch_kl_div(self, seed):
        s, t = torch.randn(8, 77), torch.randn(8, 77)
        ours = ue.forward_kl(s, t, reduction="sum")
        theirs = torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum")
        torch.testing.assert_close(ours, theirs)

    def test_without_labels_every_row_counts(self, seed):
        s, t = torch.randn(5, 31), torch.randn(5, 31)
        torch.testing.assert_close(ue.forward_kl(s, t), ue.forward_kl(s, t, reduction="sum") / 5)

    def test_student_masked_where_teacher_is_not_is_infinite(self):
        s, t = torch.randn(2, 9), torch.randn(2, 9)
        s[0, 4] = float("-inf")
        out = ue.forward_kl(s, t, reduction="none")
        assert torch.isposinf(out[0]) and torch.isfinite(out[1])
