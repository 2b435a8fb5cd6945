/* nstool: a sandbox hands another its namespaces, and the other tries to use them. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#ifndef MADV_COLD
#define MADV_COLD 20
#endif
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#define NS_GET_USERNS 0xb701
#define NS_GET_PARENT 0xb702
static const char *names[] = {"user", "mnt", "pid", "net", "ipc", "uts", "cgroup"};
#define NNS 7
#define NFD (NNS + 2)

static int sock_at(const char *path, int listen_) {
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, path, sizeof a.sun_path - 1);
    if (listen_) {
        unlink(path);
        if (bind(s, (void *)&a, sizeof a) || listen(s, 1)) { perror("bind"); exit(2); }
        chmod(path, 0777);
        return s;
    }
    for (int i = 0; i < 200; i++) {
        if (connect(s, (void *)&a, sizeof a) == 0) return s;
        usleep(20000);
    }
    perror("connect");
    exit(2);
}

static void serve(const char *path) {
    int fds[NFD];
    char p[64];
    for (int i = 0; i < NNS; i++) {
        snprintf(p, sizeof p, "/proc/self/ns/%s", names[i]);
        fds[i] = open(p, O_RDONLY);
    }
    fds[NNS] = syscall(SYS_pidfd_open, getpid(), 0);
    fds[NNS + 1] = open("/", O_PATH | O_DIRECTORY);
    int l = sock_at(path, 1);
    printf("serving\n");
    fflush(stdout);
    int c = accept(l, 0, 0);
    char buf[CMSG_SPACE(sizeof fds)] = {0};
    char byte = 'x';
    struct iovec io = {&byte, 1};
    struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = buf, .msg_controllen = sizeof buf};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(cm), fds, sizeof fds);
    if (sendmsg(c, &m, 0) < 0) { perror("sendmsg"); exit(2); }
    read(c, &byte, 1); /* until the attacker is done */
    printf("served\n");
}

static void report(const char *what, long rc) {
    printf("%s=%s\n", what, rc < 0 ? strerrorname_np(errno) : "OK");
}

static void attack(const char *path) {
    int c = sock_at(path, 0);
    int fds[NFD];
    char buf[CMSG_SPACE(sizeof fds)];
    char byte;
    struct iovec io = {&byte, 1};
    struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = buf, .msg_controllen = sizeof buf};
    if (recvmsg(c, &m, 0) <= 0) { perror("recvmsg"); exit(2); }
    memcpy(fds, CMSG_DATA(CMSG_FIRSTHDR(&m)), sizeof fds);
    char what[64];
    /* the other's user namespace first (every other join needs capabilities there) */
    for (int i = 0; i < NNS; i++) {
        snprintf(what, sizeof what, "setns_%s", names[i]);
        report(what, setns(fds[i], 0));
    }
    report("get_parent_of_user", ioctl(fds[0], NS_GET_PARENT));
    report("get_userns_of_mnt", ioctl(fds[1], NS_GET_USERNS));
    int pidfd = fds[NNS];
    report("setns_pidfd_user", setns(pidfd, CLONE_NEWUSER));
    report("setns_pidfd_all", setns(pidfd, CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID));
    report("pidfd_getfd", syscall(SYS_pidfd_getfd, pidfd, 0, 0));
    struct iovec adv = {(void *)0x10000, 4096};
    report("process_madvise", syscall(SYS_process_madvise, pidfd, &adv, 1, MADV_COLD, 0));
    /* the other's root directory: a descriptor given, not a way into its namespaces */
    int f = openat(fds[NNS + 1], "etc/hostname", O_RDONLY);
    report("read_other_root_file", f);
    /* our own user namespace: how far up may we see? */
    int own = open("/proc/self/ns/user", O_RDONLY);
    report("get_parent_of_own_user", ioctl(own, NS_GET_PARENT));
    write(c, "d", 1);
    fflush(stdout);
}

static void parents(void) {
    int fd = open("/proc/self/ns/user", O_RDONLY);
    int depth = 0;
    while (1) {
        int p = ioctl(fd, NS_GET_PARENT);
        if (p < 0) { printf("parents=%d stop=%s\n", depth, strerrorname_np(errno)); return; }
        fd = p;
        depth++;
    }
}

int main(int argc, char **argv) {
    if (argc > 2 && !strcmp(argv[1], "serve")) serve(argv[2]);
    else if (argc > 2 && !strcmp(argv[1], "attack")) attack(argv[2]);
    else if (argc > 1 && !strcmp(argv[1], "parents")) parents();
    else return 64;
    return 0;
}
