MODEL_CLASS_MAPPING = {}


def register_auto_model(name):
    def wrap(cls):
        MODEL_CLASS_MAPPING[name] = cls
        return cls

    return wrap
