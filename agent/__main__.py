from common.cli import app

app(["agent", *__import__("sys").argv[1:]])
