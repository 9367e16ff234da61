"""Short names for the generated protobuf and gRPC modules (see services/common/codegen.py)."""

from services.common.gen.distillery.common.v1 import common_pb2 as common
from services.common.gen.distillery.serving.v1 import serving_pb2 as serving
from services.common.gen.distillery.serving.v1 import serving_pb2_grpc as serving_grpc
from services.common.gen.distillery.teacher.v1 import teacher_pb2 as teacher
from services.common.gen.distillery.teacher.v1 import teacher_pb2_grpc as teacher_grpc
from services.common.gen.distillery.trainer.v1 import trainer_pb2 as trainer
from services.common.gen.distillery.trainer.v1 import trainer_pb2_grpc as trainer_grpc

__all__ = ["common", "serving", "serving_grpc", "teacher", "teacher_grpc", "trainer", "trainer_grpc"]
