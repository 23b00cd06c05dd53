import torch
import torch.nn.functional as F

import unlearn_ext as ue
from row_op_suite import OpSpec, RowOpSuite


class TestCrossEntropy(RowOpSuite):
    spec = OpSpec("cross_entropy", teachers=0, labels_required=True)

    def test_drop_in_for_torch(self, seed):
        logits = torch.randn(4, 6, 50)
        labels = torch.randint(0, 50, (4, 6))
        labels[0, :2] = -100
        for reduction in ("none", "sum", "mean"):
            ours = ue.cross_entropy(logits, labels, reduction=reduction)
            theirs = F.cross_entropy(logits.transpose(1, 2), labels, reduction=reduction)
            torch.testing.assert_close(ours, theirs)
