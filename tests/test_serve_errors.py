from lmpipe.serve.errors import ApiError, validation_error


def test_an_api_error_is_an_openai_error_body():
    error = ApiError(400, "n=2: only n=1 is supported", "n")
    assert error.body() == {
        "error": {
            "message": "n=2: only n=1 is supported",
            "type": "invalid_request_error",
            "param": "n",
            "code": None,
        }
    }
    assert ApiError(503, "busy").body()["error"]["type"] == "server_error"
    response = error.response()
    assert response.status_code == 400 and b'"param":"n"' in response.body


def test_validation_errors_become_one_400_naming_each_field():
    errors = [
        {
            "type": "greater_than_equal",
            "loc": ("body", "temperature"),
            "msg": "Input should be >= 0",
            "input": -1,
        },
        {"type": "extra_forbidden", "loc": ("body", "echo"), "msg": "Extra inputs", "input": True},
        {"type": "missing", "loc": ("body", "prompt"), "msg": "Field required", "input": {}},
    ]
    error = validation_error(errors)
    assert (error.status, error.param) == (400, "temperature")
    assert (
        error.message
        == "temperature=-1: Input should be >= 0; echo: unsupported parameter; prompt: Field required"
    )


def test_malformed_json_and_a_missing_body_have_their_own_messages():
    bad_json = [
        {
            "type": "json_invalid",
            "loc": ("body", 7),
            "msg": "JSON decode error",
            "ctx": {"error": "Expecting value"},
        }
    ]
    error = validation_error(bad_json)
    assert (error.message, error.code) == ("invalid JSON: Expecting value at character 7", "invalid_json")
    no_body = validation_error([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    assert no_body.message.startswith("request body: expected a JSON object")
