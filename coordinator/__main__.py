from common.cli import app

app(["coordinator", *__import__("sys").argv[1:]])
