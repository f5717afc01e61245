"""Request validation for the server: what is wrong with an inference request, found from its
cheapest facts (framing, declared inputs, counts, sizes) before any per-element work."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from toolkit.core.contract import INPUT_NAME
from toolkit.serving.oip import ExportModel, quoted
from toolkit.serving.options import INLINE_JSON_BYTES, JSON_SLACK_VALUES, MAX_JSON_OBJECTS


def invalid_request_message(errors: Sequence[Any]) -> str:
    """One line for pydantic's validation errors of an inference request: the first, and where."""
    first = errors[0] if errors else {}
    where = quoted(".".join(str(part) for part in first.get("loc", ()) if part != "body"))[1:-1]
    return f"invalid inference request: {first.get('msg', 'unreadable')}" + (f" at {where}" if where else "")


def binary_request_problem(header_length: bytes, body: bytes, model: ExportModel | None = None) -> str | None:
    """What is wrong with a request in the binary tensor extension's framing, or None: the JSON
    header's length, the header itself, the inputs as `model` declares them, and each input's
    `binary_data_size` against its shape; the data's elements only once all of that holds."""
    from kserve.protocol.rest.v2_datamodels import (
        InferenceRequest,  # kserve only after toolkit.serving.oip's argv guard
    )
    from kserve.utils.numpy_codec import to_np_dtype
    from pydantic import ValidationError

    try:
        length = int(header_length)
    except ValueError:
        return f"Inference-Header-Content-Length must be an integer, got {header_length[:40]!r}"
    if not 0 < length <= len(body):
        return f"Inference-Header-Content-Length {length} does not fit a body of {len(body)} bytes"
    if length > INLINE_JSON_BYTES:  # parsed on the event loop: tensor data belongs in the binary part
        return (f"the request's JSON header is {length:,} bytes, over the {INLINE_JSON_BYTES:,} it may hold: send "
                "tensor data in the binary part (binary_data_size), or the whole request as JSON")
    problem = json_counts_problem(body[:length], model)
    if problem:
        return problem
    try:
        header = json.loads(body[:length])
    except (ValueError, RecursionError):
        return "the request's JSON header is not valid JSON"
    inputs = header.get("inputs") if isinstance(header, dict) else None
    if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
        return "the request's JSON header has no list of inputs"
    # The same model the JSON path is validated with (ids, parameters, outputs, names, shapes),
    # with the binary inputs' data standing in as empty.
    try:
        request = InferenceRequest.model_validate({**header, "inputs": [{"data": [], **tensor} for tensor in inputs]})
    except ValidationError as exc:
        return invalid_request_message(exc.errors())
    problem = (counts_problem(len(inputs), len(request.outputs or ()), model) or output_flags_problem(request)
               or (model and model.declared_problem([(tensor.get("name"), tensor.get("datatype"), tensor.get("shape"))
                                                     for tensor in inputs])))
    if problem:
        return problem
    offset = length
    for tensor in inputs:
        name, shape, datatype = tensor.get("name"), tensor.get("shape"), tensor.get("datatype")
        parameters = tensor.get("parameters") or {}
        if not isinstance(parameters, dict):
            return f"input {quoted(name)}: parameters must be an object"
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            return f"input {quoted(name)} has no valid shape"
        dtype = to_np_dtype(datatype) if isinstance(datatype, str) else None
        if dtype is None:
            return f"input {quoted(name)} has no valid datatype, got {str(datatype)[:40]!r}"
        size = parameters.get("binary_data_size")
        if size is None:
            continue
        if type(size) is not int or size < 0:
            return f"input {quoted(name)} has an invalid binary_data_size"
        if "data" in tensor:  # which one would be read? gRPC refuses contents beside raw contents too
            return f"input {quoted(name)} has both data and binary_data_size; send one"
        problem = raw_tensor_problem(name, datatype, shape, body[offset:offset + size])
        if problem:
            return problem
        offset += size
    if offset != len(body):
        return f"the inputs' binary_data_size add up to {offset - length} bytes, the body holds {len(body) - length}"
    return None


def raw_tensor_problem(name: Any, datatype: str, shape: list[int], data: bytes) -> str | None:
    """What is wrong with one input's raw bytes (the binary extension's, or gRPC's
    `raw_input_contents`) for its datatype and shape, or None."""
    from kserve.utils.numpy_codec import to_np_dtype

    dtype = to_np_dtype(datatype)
    if dtype is None:
        return f"input {quoted(name)} has no valid datatype, got {str(datatype)[:40]!r}"
    if datatype == "BYTES":
        if _utf8_elements(data, math.prod(shape)) != math.prod(shape):
            # KServe decodes BYTES elements as text; files go base64-encoded, as in JSON.
            return (f"input {quoted(name)}: BYTES data must hold {math.prod(shape)} whole UTF-8 elements "
                    "(send image files base64-encoded)")
    elif len(data) != math.prod(shape) * np.dtype(dtype).itemsize:
        return f"input {quoted(name)}: {len(data)} bytes of data do not fit {datatype} shape {shape}"
    return None


def counts_problem(inputs: int, outputs: int, model: ExportModel | None) -> str | None:
    """What is wrong with a request of `inputs` inputs naming `outputs` outputs, or None: more
    than the one input `model` takes, or more outputs than it answers. Counted before any is
    looked at: KServe builds an object for each, and 3 million gRPC inputs held the loop 8 s."""
    if not model:
        return None
    if inputs > 1:
        return f"expected one input {INPUT_NAME!r}, got {inputs:,} inputs"
    offered = [output["name"] for output in model.get_output_types()]
    if outputs > len(offered):
        return f"the request names {outputs:,} outputs; {model.name} answers {len(offered)}: {', '.join(offered)}"
    return None


def output_flags_problem(request: Any) -> str | None:
    """What is wrong with an inference request's choice of binary outputs, or None: the
    protocol's flags are booleans, and KServe would read any value as one."""
    if not isinstance((request.parameters or {}).get("binary_data_output", False), bool):
        return "parameters.binary_data_output must be true or false"
    for output in request.outputs or ():
        if not isinstance((output.parameters or {}).get("binary_data", False), bool):
            return f"output {quoted(output.name)}: parameters.binary_data must be true or false"
    return None


def _utf8_elements(data: bytes, most: int) -> int:
    """How many elements a serialized BYTES tensor (each a 4-byte little-endian length, then
    that many bytes) holds; -1 unless it is whole, every element is UTF-8 and there are at most
    `most` (the shape's count: more is wrong, and is not read through)."""
    offset, count = 0, 0
    while offset < len(data):
        if offset + 4 > len(data) or count == most:
            return -1
        size = int.from_bytes(data[offset:offset + 4], "little")
        element = data[offset + 4:offset + 4 + size]
        if len(element) != size:
            return -1
        try:
            element.decode("utf-8")
        except UnicodeDecodeError:
            return -1
        offset, count = offset + 4 + size, count + 1
    return count


def json_counts_problem(text: bytes, model: ExportModel | None) -> str | None:
    """What is wrong with a request's JSON (a body, or a binary request's header) by counts made
    at C speed before it is parsed, or None: its values (by their commas), more than `model`
    takes, and its objects (by their '{'), more than a request's inputs, outputs and parameters
    need: each output becomes a Python object, and millions held the loop for 30 s."""
    if text.count(b"{") > MAX_JSON_OBJECTS:
        return (f"the request holds over {MAX_JSON_OBJECTS} JSON objects (counted by their '{{'); a request's "
                "inputs, outputs and parameters need far fewer")
    most = (model.max_values if model else 0) + JSON_SLACK_VALUES
    if text.count(b",") >= most:
        return (f"the request holds over {most:,} JSON values (counted by their commas)"
                + (f"; {model.name} takes at most {model.max_values:,} a request" if model else ""))
    return None


def json_request(body: bytes, model: ExportModel) -> Any:
    """An infer request's JSON body as KServe's request model, checked as `model` declares its
    input before any element is converted; the body's values are counted (by their commas,
    at C speed) before it is parsed at all: more than the model takes are refused unparsed."""
    from kserve.errors import InvalidInput
    from kserve.protocol.rest.v2_datamodels import InferenceRequest
    from pydantic import ValidationError

    problem = json_counts_problem(body, model)
    if problem:
        raise InvalidInput(problem)
    try:
        request = InferenceRequest.model_validate_json(body, strict=True)  # strict: no `true` for 1
    except ValidationError as exc:
        raise InvalidInput(invalid_request_message(exc.errors())) from None
    problem = (counts_problem(len(request.inputs), len(request.outputs or ()), model) or output_flags_problem(request)
               or model.declared_problem([(tensor.name, tensor.datatype, tensor.shape) for tensor in request.inputs]))
    for tensor in request.inputs:
        if not problem and "binary_data_size" in (tensor.parameters or {}):  # KServe would read `data`
            problem = f"input {quoted(tensor.name)} has binary_data_size but the request is not in the binary extension"
    if problem:
        raise InvalidInput(problem)
    return request
