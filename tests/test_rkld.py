import torch

import unlearn_ext as ue
from unlearn_ext import reference
from row_op_suite import BACKENDS, OpSpec, RowOpSuite, make_inputs

import pytest


class TestRKLD(RowOpSuite):
    spec = OpSpec("rkld", teachers=2, labels_required=False, params={"alpha": 8.0})

    @pytest.mark.parametrize("backend", BACKENDS)
    @pytest.mark.parametrize("alpha", [0.0, 0.5, 30.0])
    def test_equals_reverse_kl_to_the_built_teacher(self, backend, alpha, seed):
        name, device = backend
        s, (o, a), labels = make_inputs(self.spec, (6, 257), torch.float32, device)
        teacher = reference.rkld_teacher(o, a, alpha)
        torch.testing.assert_close(ue.rkld(s, o, a, labels, alpha=alpha, backend=name, reduction="none"),
                                   ue.reverse_kl(s, teacher, labels, backend=name, reduction="none"),
                                   rtol=1e-5, atol=1e-5)

    def test_teacher_pushes_down_what_the_augmented_model_learned(self):
        o = torch.zeros(1, 4)
        a = torch.tensor([[0.0, 3.0, 0.0, -2.0]])
        teacher = reference.rkld_teacher(o, a, alpha=8.0)
        assert torch.equal(teacher, torch.tensor([[0.0, -24.0, 0.0, 0.0]]))

    def test_masked_original_stays_masked(self):
        o = torch.tensor([[0.0, float("-inf"), 1.0]])
        a = torch.tensor([[0.0, float("-inf"), 2.0]])
        assert torch.equal(reference.rkld_teacher(o, a, 8.0), torch.tensor([[0.0, float("-inf"), -7.0]]))

    def test_negative_alpha_is_refused(self):
        s = torch.randn(2, 5)
        with pytest.raises(ValueError, match="alpha"):
            ue.rkld(s, s, s, alpha=-1.0)
