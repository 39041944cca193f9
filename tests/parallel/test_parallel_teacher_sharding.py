"""Where the teacher's weights and activations travel in the compiled step: collectives inside the teacher solve's
loop per config.sharding.teacher, counted from the optimised HLO (`parallel.hlo_stats`)."""

from absl.testing import absltest
import jax

from configs import tiny
from perflow_jax import benchmark
from perflow_jax import train_step as ts
from perflow_jax.parallel import hlo_stats
from perflow_jax.parallel import mesh as mesh_lib
from perflow_jax.parallel import sharding as sh

# A hand-written module: the loop's body reaches an all-gather through a call, runs an all-reduce itself and an
# inner loop with a collective-permute; the entry has one all-gather of its own. The loop's result type is a tuple
# with an /*index=*/ comment (an '=' inside the type), as XLA prints long tuples.
_HLO = """\
HloModule m, entry_computation_layout={(f32[2,4]{1,0})->f32[2,4]{1,0}}

%gather (p.1: f32[2,4]) -> f32[16,4] {
  %p.1 = f32[2,4]{1,0} parameter(0)
  ROOT %ag.1 = f32[16,4]{1,0} all-gather(%p.1), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}
}

%inner_body (a.2: (s32[], f32[2,4])) -> (s32[], f32[2,4]) {
  %a.2 = (s32[], f32[2,4]{1,0}) parameter(0)
  %x.2 = f32[2,4]{1,0} get-tuple-element(%a.2), index=1
  %cp.2 = f32[2,4]{1,0} collective-permute(%x.2), channel_id=3, source_target_pairs={{0,1},{1,0}}
  %i.2 = s32[] get-tuple-element(%a.2), index=0
  ROOT %t.2 = (s32[], f32[2,4]{1,0}) tuple(%i.2, %cp.2)
}

%cond (a.3: (s32[], f32[2,4])) -> pred[] {
  %a.3 = (s32[], f32[2,4]{1,0}) parameter(0)
  %i.3 = s32[] get-tuple-element(%a.3), index=0
  %n.3 = s32[] constant(3)
  ROOT %lt.3 = pred[] compare(%i.3, %n.3), direction=LT
}

%body (a.4: (s32[], f32[2,4], f32[2])) -> (s32[], f32[2,4], f32[2]) {
  %a.4 = (s32[], f32[2,4]{1,0}, f32[2]{0}) parameter(0)
  %x.4 = f32[2,4]{1,0} get-tuple-element(%a.4), index=1
  %g.4 = f32[16,4]{1,0} call(%x.4), to_apply=%gather
  %ar.4 = f32[2,4]{1,0} all-reduce(%x.4), channel_id=2, replica_groups=[1,8]<=[8], to_apply=%add
  %i.4 = s32[] get-tuple-element(%a.4), index=0
  %t.4 = (s32[], f32[2,4]{1,0}) tuple(%i.4, %ar.4)
  %w.4 = (s32[], f32[2,4]{1,0}) while(%t.4), condition=%cond, body=%inner_body
  %y.4 = f32[2]{0} get-tuple-element(%a.4), index=2
  ROOT %r.4 = (s32[], f32[2,4]{1,0}, f32[2]{0}) tuple(%i.4, %x.4, %y.4)
}

%add (x.5: f32[], y.5: f32[]) -> f32[] {
  %x.5 = f32[] parameter(0)
  %y.5 = f32[] parameter(1)
  ROOT %s.5 = f32[] add(%x.5, %y.5)
}

ENTRY %main (p.6: f32[2,4]) -> f32[2,4] {
  %p.6 = f32[2,4]{1,0} parameter(0)
  %ag.6 = f32[16,4]{1,0} all-gather(%p.6), channel_id=4, replica_groups=[1,8]<=[8], dimensions={0}
  %z.6 = s32[] constant(0)
  %v.6 = f32[2]{0} constant({0, 0})
  %t.6 = (s32[], f32[2,4]{1,0}, f32[2]{0}) tuple(%z.6, %p.6, %v.6)
  %w.6 = (s32[], f32[2,4]{1,0}, /*index=2*/f32[2]{0}) while(%t.6), condition=%cond, body=%body, metadata={op_name="jit(f)/teacher_solve/while"}
  ROOT %o.6 = f32[2,4]{1,0} get-tuple-element(%w.6), index=1
}
"""


class HloStatsTest(absltest.TestCase):

  def test_counts_collectives_per_loop_and_outside(self):
    loops = {loop.op_name: loop for loop in hlo_stats.loop_collectives(_HLO)}
    self.assertEqual(set(loops), {"jit(f)/teacher_solve/while", ""})
    outer = loops["jit(f)/teacher_solve/while"]
    self.assertEqual(outer.counts, {"all-gather": 1, "all-reduce": 1, "collective-permute": 1})
    self.assertEqual(outer.shapes["all-gather"], ["f32[16,4]"])
    self.assertEqual(outer.total, 3)
    self.assertEqual(loops[""].counts, {"collective-permute": 1})  # the inner loop on its own
    self.assertEqual(hlo_stats.entry_collectives(_HLO), {"all-gather": 1})


class TeacherShardingTest(absltest.TestCase):
  """The tiny config's step on 8 simulated devices, pure FSDP (data=1, fsdp=8), batch 8."""

  def _solver_loop(self, mode: str) -> hlo_stats.LoopCollectives:
    config = tiny.get_config()
    config.mesh.data, config.mesh.fsdp = 1, 8
    config.sharding.teacher = mode
    config = benchmark._training_config(config, 0, "")  # pylint: disable=protected-access  (latent batches)
    setup = benchmark.build_step(config, mesh_lib.make_mesh(config.mesh))
    hlo = setup.step.lower(*setup.abstract_args).compile().as_text()
    loops = [l for l in hlo_stats.loop_collectives(hlo) if f"/{ts.TEACHER_SOLVE_SCOPE}/" in l.op_name]
    self.assertLen(loops, 1)
    return loops[0]

  def test_a_sharded_teacher_communicates_inside_the_solver_loop(self):
    # Sharded like the student and used sharded, the teacher's UNet calls inside the loop make the partitioner
    # move activations (gathered over the batch: [8, ...]) on every one of the S solver steps. The default,
    # 'gather_once', leaves the loop without collectives: tests/test_benchmark.py checks that on its compile.
    fsdp = self._solver_loop("fsdp")
    self.assertGreater(fsdp.total, 0)
    self.assertTrue(all(s.startswith("f32[8,") for s in fsdp.shapes.get("all-gather", [])), fsdp.shapes)

  def test_placements(self):
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 8})
    spec = {"w": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))}
    self.assertEqual(sh.teacher_placement("fsdp", spec, mesh), (spec, None))
    self.assertEqual(sh.teacher_placement("gather_once", spec, mesh), (spec, sh.replicated(mesh)))
    self.assertEqual(sh.teacher_placement("replicated", spec, mesh), ({"w": sh.replicated(mesh)}, None))
    with self.assertRaisesRegex(ValueError, "config.sharding.teacher='zero3' is not one of"):
      sh.teacher_placement("zero3", spec, mesh)


if __name__ == "__main__":
  absltest.main()
